"""HD95 and ASSD in mm: hand-computed distances, spacing, singleton axes, the empty policy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from medflow.metrics.surface import surface_metrics, worst_case_distance


def _squares(k: int) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4 reference square at rows/cols 2..5 and the same square shifted by ``k`` rows."""
    ref = np.zeros((12, 10), dtype=bool)
    ref[2:6, 2:6] = True
    return np.roll(ref, k, axis=0), ref


def test_offset_squares_by_hand():
    # Shift by 2 rows. Surface = the 12-voxel ring of each square. From the prediction ring
    # (rows 4..7) to the reference ring (rows 2..5): row 4 cols 2,5 lie on it (0), row 4 cols 3,4
    # are 1 from (4,2)/(5,3); row 5 cols 2,5 lie on it (0); row 6 cols 2,5 are 1 from row 5;
    # row 7 (4 voxels) is 2 from row 5. So {0 x4, 1 x4, 2 x4}, and the same the other way.
    # ASSD = 24 / 24 = 1; the 95th percentile of each direction is 2, so HD95 = 2.
    pred, ref = _squares(2)
    hd95, assd = surface_metrics(pred, ref, (1.0, 1.0))
    assert hd95 == pytest.approx(2.0)
    assert assd == pytest.approx(1.0)
    assert surface_metrics(ref, pred, (1.0, 1.0)) == pytest.approx((hd95, assd))


def test_spacing_along_the_shift_scales_it():
    pred, ref = _squares(2)
    # rows 2 mm apart: row 4 cols 3,4 stay 1 mm (from (4,2) along a column); row 6 becomes
    # 2 mm, row 7 4 mm: {0 x4, 1 x2, 2 x2, 4 x4} = 22 per direction, ASSD = 22/12, HD95 = 4.
    hd95, assd = surface_metrics(pred, ref, (2.0, 1.0))
    assert hd95 == pytest.approx(4.0)
    assert assd == pytest.approx(22 / 12, rel=1e-6)
    # columns 2 mm apart: row 4 cols 3,4 now reach row 5 at 1 mm; nothing else moves.
    assert surface_metrics(pred, ref, (1.0, 2.0)) == pytest.approx((2.0, 1.0))


@pytest.mark.parametrize(("z_mm", "hd95", "assd"), [(1.0, 1.0, 10 / 26), (3.0, 3.0, 28 / 26)])
def test_3d_cubes_offset_along_z(z_mm, hd95, assd):
    # 3x3x3 cubes (26 surface voxels each: all but the centre) one slice apart. From pred to
    # ref: 16 ring voxels of the two shared slices lie on ref's surface (0); pred's bottom-face
    # centre is ref's centre, 1 voxel (1 mm in-plane) from ref's surface; pred's top face (9) is
    # one slice, z_mm, above ref's top face. Symmetric, so ASSD = (1 + 9 z) / 26, HD95 = z.
    ref = np.zeros((5, 5, 6), dtype=bool)
    ref[1:4, 1:4, 1:4] = True
    pred = np.roll(ref, 1, axis=2)
    got = surface_metrics(pred, ref, (1.0, 1.0, z_mm))
    assert got == pytest.approx((hd95, assd), rel=1e-6)


def test_hd95_ignores_one_far_outlier_but_assd_sees_it():
    ref = np.zeros((32, 32), dtype=bool)
    ref[2:12, 2:12] = True  # 36 surface voxels
    pred = ref.copy()
    pred[25, 6] = True  # 14 from ref's bottom row 11
    hd95, assd = surface_metrics(pred, ref, (1.0, 1.0))
    # pred -> ref is 36 zeros and one 14; its 95th percentile (index 34.2 of 37) is 0
    assert hd95 == pytest.approx(0.0)
    assert assd == pytest.approx(14 / (37 + 36), rel=1e-6)


def test_identical_masks_are_zero():
    pred, ref = _squares(0)
    assert surface_metrics(pred, ref, (0.7, 1.3)) == (0.0, 0.0)


def test_singleton_z_matches_2d():
    # a 2D image stored as (H, W, 1); without dropping Z, MONAI's erosion would call every
    # voxel surface and give ASSD 0.75 here
    pred, ref = _squares(2)
    got = surface_metrics(pred[..., None], ref[..., None], (2.0, 1.0, 5.0))
    assert got == pytest.approx(surface_metrics(pred, ref, (2.0, 1.0)))
    assert got == pytest.approx((4.0, 22 / 12), rel=1e-6)


def test_worst_case_distance_by_hand():
    # (5-1)*2 = 8, (9-1)*0.5 = 4, (4-1)*3 = 9  ->  sqrt(64 + 16 + 81)
    assert worst_case_distance((5, 9, 4), (2.0, 0.5, 3.0)) == pytest.approx(math.sqrt(161))


@pytest.mark.parametrize(("ref_on", "pred_on"), [(False, False), (True, False), (False, True)])
def test_empty_policy(ref_on, pred_on):
    shape, spacing = (5, 9, 4), (2.0, 0.5, 3.0)
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[2, 3, 1] = ref_on
    pred[0, 0, 0] = pred_on
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI's empty-mask warnings would mean we called it
        got = surface_metrics(pred, ref, spacing)
    want = 0.0 if not (ref_on or pred_on) else math.sqrt(161)
    assert got == pytest.approx((want, want))


def test_both_non_empty_uses_real_distance():
    shape, spacing = (5, 9, 4), (2.0, 0.5, 3.0)
    ref = np.zeros(shape, dtype=bool)
    pred = np.zeros_like(ref)
    ref[2, 3, 1] = pred[2, 5, 1] = True  # two columns apart at 0.5 mm
    assert surface_metrics(pred, ref, spacing) == pytest.approx((1.0, 1.0))


def test_bad_input():
    m = np.zeros((4, 4), dtype=bool)
    with pytest.raises(ValueError, match="binary"):
        surface_metrics(np.full((4, 4), 2), m, (1.0, 1.0))
    with pytest.raises(ValueError, match="3 values for a 2D mask"):
        surface_metrics(m, m, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        surface_metrics(m, m, (1.0, 0.0))
    with pytest.raises(ValueError, match="differs"):
        surface_metrics(m, m[:3], (1.0, 1.0))
