"""Dice and IoU from tp/fp/fn: hand-computed cases, the empty policy, and MONAI as a check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_iou

from medflow.metrics.overlap import confusion, dice, dice_per_class, dice_rows, iou


def test_2d_counts_dice_and_iou_by_hand():
    pred = np.array([[1, 1, 0], [0, 1, 0], [2, 0, 0]])
    ref = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 2]])
    # class 1: both at (0,0) and (1,1); only pred at (0,1); only ref at (1,0)
    assert confusion(pred, ref, 1) == (2, 1, 1)
    assert dice(2, 1, 1) == pytest.approx(4 / 6)
    assert iou(2, 1, 1) == pytest.approx(2 / 4)
    # class 2: pred at (2,0), ref at (2,2): no overlap at all
    assert confusion(pred, ref, 2) == (0, 1, 1)
    assert dice(0, 1, 1) == 0.0 and iou(0, 1, 1) == 0.0
    # background is a class like any other for these counts: both 0 at (0,2), (1,2), (2,1);
    # only pred 0 at (1,0), (2,2); only ref 0 at (0,1), (2,0)
    assert confusion(pred, ref, 0) == (3, 2, 2)


def test_3d_counts():
    ref = np.zeros((4, 4, 4), dtype=np.int16)
    pred = np.zeros_like(ref)
    ref[:2, :2, :3] = 1  # 12 voxels
    pred[:2, :2, 1:3] = 1  # 8 voxels, all inside ref
    tp, fp, fn = confusion(pred, ref, 1)
    assert (tp, fp, fn) == (8, 0, 4)
    assert dice(tp, fp, fn) == pytest.approx(16 / 20)
    assert iou(tp, fp, fn) == pytest.approx(8 / 12)


@pytest.mark.parametrize(
    ("ref_on", "pred_on", "expected"),
    [
        (False, False, 1.0),  # absence predicted correctly
        (True, False, 0.0),  # missed structure
        (False, True, 0.0),  # false structure
        (True, True, 2 * 1 / (2 * 1 + 1 + 0)),  # ref 1 voxel inside pred 2 voxels: 2/3
    ],
)
def test_empty_policy(ref_on, pred_on, expected):
    ref = np.zeros((3, 3), dtype=np.int16)
    pred = np.zeros_like(ref)
    if ref_on:
        ref[1, 1] = 1
    if pred_on:
        pred[1, 1:] = 1
    counts = confusion(pred, ref, 1)
    assert dice(*counts) == pytest.approx(expected)
    # IoU = Dice / (2 - Dice) holds in every case, the policy included
    assert iou(*counts) == pytest.approx(expected / (2 - expected))


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        confusion(np.zeros((2, 3)), np.zeros((3, 2)), 1)
    with pytest.raises(ValueError, match="non-negative"):
        dice(1, -1, 0)
    with pytest.raises(ValueError, match="non-negative"):
        iou(0, 0, -2)


def _one_hot(labels: np.ndarray, n: int) -> torch.Tensor:
    t = torch.as_tensor(labels, dtype=torch.long)
    return torch.nn.functional.one_hot(t, n).movedim(-1, 0)[None].float()


@pytest.mark.parametrize("shape", [(17, 13), (7, 6, 5)])
def test_matches_monai_on_random_label_maps(shape):
    rng = np.random.default_rng(1)
    n = 4
    for _ in range(3):
        pred = rng.integers(0, n, size=shape)
        ref = rng.integers(0, n, size=shape)
        want_dice = compute_dice(_one_hot(pred, n), _one_hot(ref, n), include_background=True)
        want_iou = compute_iou(_one_hot(pred, n), _one_hot(ref, n), include_background=True)
        for c in range(n):
            counts = confusion(pred, ref, c)
            assert dice(*counts) == pytest.approx(float(want_dice[0, c]), abs=1e-6)
            assert iou(*counts) == pytest.approx(float(want_iou[0, c]), abs=1e-6)


def test_dice_per_class_pools_every_slice_and_scores_an_absent_class_as_one():
    pred = np.array([[[0, 1], [1, 2]], [[0, 0], [1, 1]]])
    ref = np.array([[[0, 1], [2, 2]], [[0, 0], [0, 1]]])
    # class 1: pred at 4 places, ref at 2, overlap 2 -> 4 / 6; class 2: 1 and 2, overlap 1
    # class 3: absent from both
    assert dice_per_class(pred, ref, 4) == pytest.approx([4 / 6, 2 / 3, 1.0])


def test_dice_rows_scores_each_row_alone():
    a = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=bool)
    b = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=bool)
    assert dice_rows(a, b).tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        dice_rows(a, b[:, :3])
