"""Surface distances in millimetres: HD95 and ASSD between two binary masks, via MONAI.

The distances come from :func:`monai.metrics.compute_hausdorff_distance` (``percentile=95``)
and :func:`monai.metrics.compute_average_surface_distance` (``symmetric=True``), both given the
voxel spacing, so an anisotropic grid is measured in mm, not voxels. In MONAI's definitions:

* surface voxels are the mask voxels removed by one binary erosion (voxels on the image border
  count as surface), and distances run between surface-voxel centres;
* HD95 is the larger of the two directed 95th percentiles (pred -> ref, ref -> pred), each
  linearly interpolated (``torch.quantile``);
* ASSD is the mean over the pooled distances of both directions.

Axes of length 1 are dropped before calling MONAI: they add nothing to any distance, but its
erosion would make every voxel of a one-voxel-thick slab "surface" (a 2D image stored as
``(H, W, 1)`` would get a wrong ASSD).

Empty-mask policy, applied here before MONAI is called (MONAI returns NaN or inf for empty
masks, and its reductions drop NaN silently, which would hide a missed structure from a mean):

* reference empty and prediction empty: HD95 = ASSD = 0;
* exactly one of them empty (a missed or a false structure): HD95 = ASSD = the worst-case
  distance, the diagonal of the image's physical extent ``sqrt(sum(((n_i - 1) s_i)^2))``, a
  finite penalty that cannot vanish from a mean;
* both non-empty: MONAI's values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np


def worst_case_distance(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The diagonal of the image's physical extent in mm: the farthest two voxel centres can be.

    Args:
        shape: spatial shape ``(n_0, n_1, ...)``.
        spacing: voxel size per axis in mm, same length as ``shape``.

    Returns:
        ``sqrt(sum(((n_i - 1) * s_i) ** 2))``.
    """
    if len(shape) != len(spacing):
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for shape {shape}")
    return math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing)))


def _as_binary(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        # a label map passed by mistake would otherwise merge all its classes into one
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{name} must be binary (bool or 0/1), got values {np.unique(mask)}")
        mask = mask.astype(bool)
    return mask


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for a {ndim}D mask")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive and finite, got {spacing}")
    return spacing


def surface_metrics(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]
) -> tuple[float, float]:
    """HD95 and ASSD in mm between two binary masks, with the empty-mask policy above.

    Args:
        pred_mask: predicted binary mask, 2D ``(H, W)`` or 3D ``(X, Y, Z)`` (bool or 0/1).
        ref_mask: reference binary mask, same shape.
        spacing: voxel size in mm per axis of the masks.

    Returns:
        ``(hd95, assd)`` in mm, always finite.

    Raises:
        ValueError: shapes differ, a mask is not binary, or spacing does not fit the masks.
    """
    pred, ref = _as_binary(pred_mask, "pred_mask"), _as_binary(ref_mask, "ref_mask")
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    spacing = _check_spacing(spacing, pred.ndim)

    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not pred_any and not ref_any:
        return 0.0, 0.0
    if pred_any != ref_any:
        worst = worst_case_distance(pred.shape, spacing)
        return worst, worst

    keep = [i for i, n in enumerate(pred.shape) if n > 1] or [0]
    # squeezing a length-1 axis moves no voxel centre, so every distance is unchanged
    pred = pred.reshape([pred.shape[i] for i in keep])
    ref = ref.reshape([ref.shape[i] for i in keep])
    spacing = [spacing[i] for i in keep]
    return _monai_distances(pred, ref, spacing)


def _monai_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: list[float]
) -> tuple[float, float]:
    """MONAI's HD95 and ASSD for two non-empty masks of the same shape."""
    # imported here: monai.metrics takes seconds to import, which `medflow --help` should not pay
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    # MONAI wants (B, C, *spatial); one channel and include_background=True, else it is dropped
    y_pred = pred[None, None].astype(np.float32)
    y = ref[None, None].astype(np.float32)
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 warns about an argument its own get_edge_surface_distance passes
        warnings.filterwarnings("ignore", ".*always_return_as_numpy", FutureWarning)
        hd95 = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=spacing
        )
        assd = compute_average_surface_distance(
            y_pred, y, include_background=True, symmetric=True, spacing=spacing
        )
    hd95, assd = float(hd95.reshape(-1)[0]), float(assd.reshape(-1)[0])
    assert math.isfinite(hd95) and math.isfinite(assd), "non-empty masks gave a non-finite distance"
    return hd95, assd
