import math

import numpy as np
import pytest

from medflow.metrics.lesions import LesionDetection, components, lesion_detection, pool


@pytest.fixture
def case():
    """Reference: lesion A (3x3x3 cube), B (one voxel), C (two voxels). Prediction: one
    voxel inside A, exactly B, and a false component D; C is missed."""
    ref = np.zeros((12, 12, 6), dtype=np.uint8)
    ref[1:4, 1:4, 1:4] = 1  # A, 27 voxels
    ref[8, 8, 2] = 1  # B
    ref[8, 1, 4:6] = 1  # C
    pred = np.zeros_like(ref)
    pred[3, 3, 3] = 1  # inside A, IoU 1/27
    pred[8, 8, 2] = 1  # B, IoU 1
    pred[5, 10, 0:2] = 1  # D
    return pred, ref


def test_counts_and_scores_by_hand(case):
    pred, ref = case
    d = lesion_detection(pred, ref)
    assert (d.tp, d.fn, d.fp, d.tp_predicted) == (2, 1, 1, 2)
    assert (d.n_reference, d.n_predicted) == (3, 3)
    assert d.recall == pytest.approx(2 / 3) and d.precision == pytest.approx(2 / 3)
    assert d.f1 == pytest.approx(2 / 3)


def test_iou_threshold(case):
    pred, ref = case
    d = lesion_detection(pred, ref, min_iou=0.5)
    # A's overlap (1/27) no longer counts: A is missed and its voxel is a false component
    assert (d.tp, d.fn, d.fp, d.tp_predicted) == (1, 2, 2, 1)
    assert d.f1 == pytest.approx(1 / 3)
    assert lesion_detection(pred, ref, min_iou=1 / 27).tp == 2
    with pytest.raises(ValueError, match="min_iou"):
        lesion_detection(pred, ref, min_iou=1.5)


def test_one_component_over_two_lesions_and_two_over_one():
    ref = np.zeros((1, 10), dtype=np.uint8)
    ref[0, [1, 3]] = 1  # two lesions
    pred = np.zeros_like(ref)
    pred[0, 1:4] = 1  # one component covering both
    d = lesion_detection(pred, ref)
    assert (d.tp, d.fn, d.fp, d.tp_predicted) == (2, 0, 0, 1) and d.f1 == 1.0
    ref2 = np.zeros((1, 10), dtype=np.uint8)
    ref2[0, 1:6] = 1
    pred2 = np.zeros_like(ref2)
    pred2[0, [1, 4]] = 1  # two components on one lesion
    d = lesion_detection(pred2, ref2)
    assert (d.tp, d.fn, d.fp, d.tp_predicted) == (1, 0, 0, 2) and d.f1 == 1.0


def test_connectivity():
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # touching at a corner
    assert components(mask)[1] == 1
    assert components(mask, connectivity=1)[1] == 2
    ref = mask.astype(np.uint8)
    pred = np.zeros_like(ref)
    pred[0, 0, 0] = 1
    assert lesion_detection(pred, ref).recall == 1.0
    assert lesion_detection(pred, ref, connectivity=1).recall == 0.5
    with pytest.raises(ValueError, match="connectivity"):
        components(mask, connectivity=4)


@pytest.mark.parametrize(
    "ref_any, pred_any, precision, recall, f1",
    [
        (False, False, 1.0, 1.0, 1.0),  # nothing to find, nothing found
        (False, True, 0.0, 1.0, 0.0),  # only false positives
        (True, False, 1.0, 0.0, 0.0),  # everything missed
        (True, True, 1.0, 1.0, 1.0),
    ],
)
def test_empty_policy(ref_any, pred_any, precision, recall, f1):
    ref = np.zeros((4, 4, 4), dtype=np.uint8)
    pred = np.zeros_like(ref)
    if ref_any:
        ref[1, 1, 1] = 1
    if pred_any:
        pred[1, 1, 1] = 1
    d = lesion_detection(pred, ref)
    assert (d.precision, d.recall, d.f1) == (precision, recall, f1)
    assert not any(math.isnan(v) for v in (d.precision, d.recall, d.f1))


def test_size_bins_use_spacing(case):
    pred, ref = case
    d = lesion_detection(pred, ref, size_bins_mm=(0, 2, 5))
    # equivalent sphere diameters at 1 mm: B (1 voxel) 1.24, C (2) 1.56, A (27) 3.72 mm
    small, middle, large = d.size_bins
    assert (small.lesions, small.detected, small.recall) == (2, 1, 0.5)
    assert (middle.lesions, middle.detected, middle.recall) == (1, 1, 1.0)
    assert (large.lesions, large.recall, large.hi_mm) == (0, None, math.inf)
    # at 2 mm voxels every lesion is 2x wider: A (7.4 mm) leaves the 2-5 mm bin
    d = lesion_detection(pred, ref, spacing=(2, 2, 2), size_bins_mm=(0, 2, 5))
    assert [b.lesions for b in d.size_bins] == [0, 2, 1]
    assert d.to_dict()["size_bins"][2]["hi_mm"] is None
    with pytest.raises(ValueError, match="increasing"):
        lesion_detection(pred, ref, size_bins_mm=(5, 2))


def test_2d_disc_diameters():
    ref = np.zeros((10, 10, 1), dtype=np.uint8)
    ref[2:5, 2:5, 0] = 1  # 9 px: disc diameter 2 sqrt(9 / pi) = 3.39 mm
    d = lesion_detection(ref, ref, size_bins_mm=(0, 3.3, 3.5))
    assert [b.lesions for b in d.size_bins] == [0, 1, 0]


def test_pool_is_a_micro_average(case):
    pred, ref = case
    a = lesion_detection(pred, ref, size_bins_mm=(0, 2))
    empty = np.zeros_like(ref)
    b = lesion_detection(empty, ref, size_bins_mm=(0, 2))  # all three missed
    pooled = pool([a, b])
    assert (pooled.tp, pooled.fn, pooled.fp, pooled.tp_predicted) == (2, 4, 1, 2)
    assert pooled.recall == pytest.approx(2 / 6) and pooled.precision == pytest.approx(2 / 3)
    assert [bin.lesions for bin in pooled.size_bins] == [4, 2]
    with pytest.raises(ValueError, match="no lesion detection"):
        pool([])
    with pytest.raises(ValueError, match="different size bins"):
        pool([a, lesion_detection(pred, ref)])


def test_label_selection_and_shapes():
    ref = np.zeros((5, 5), dtype=np.uint8)
    ref[0, 0] = 1
    ref[4, 4] = 2
    pred = np.zeros_like(ref)
    pred[4, 4] = 2
    assert lesion_detection(pred, ref, label=2).f1 == 1.0
    assert lesion_detection(pred, ref, label=None).recall == 0.5
    with pytest.raises(ValueError, match="shape"):
        lesion_detection(pred[:4], ref)
    assert isinstance(lesion_detection(pred, ref), LesionDetection)
