"""A simulated acquisition shift: the same anatomy as if scanned at another site.

:func:`apply_shift` maps a skull-stripped MR volume ``(X, Y, Z)`` (slices along Z) to what a
different scanner could have recorded, in this order:

1. **contrast** (``gamma``): head intensities are divided by the volume's robust maximum
   (99.5th percentile of its nonzero voxels), raised to ``gamma`` and multiplied back, as a
   sequence with other relaxation weighting would remap tissue intensities;
2. **bias field** (``bias_strength``, ``bias_order``): multiplied by ``exp(f)``, ``f`` a
   random polynomial of degree ``<= bias_order`` in the voxel coordinates (isotropic voxels
   assumed), centred over the head and scaled so ``max |f| = bias_strength`` there: a
   receive coil's smooth, spatially varying sensitivity;
3. **resolution** (``blur_sigma``, ``downsample``): an optional in-plane Gaussian blur (a
   wider point-spread function), then an area average over ``downsample x downsample``
   in-plane blocks (acquisition on a coarser in-plane grid) resampled back bilinearly onto
   the original grid;
4. **noise** (``noise_std``): Gaussian noise drawn on the acquisition grid and resampled
   like the signal, so it is as spatially correlated as in a real low-resolution scan;
   scaled so that its standard deviation inside the head is ``noise_std`` times the
   standard deviation of the noiseless head intensities;
5. **mask**: multiplied by the input's nonzero mask, and head voxels floored at a small
   positive value.

Why each component survives medflow's preprocessing (per-image z-score over nonzero voxels,
then a crop to the nonzero box): a z-score removes exactly one thing, a global gain and
offset ``a x + b``. ``x ** gamma`` is not affine for ``gamma != 1``, so it changes the
z-scored distance between grey and white matter (the robust maximum is only a global gain
and drops out). A bias field is a gain that varies across the image, which no single pair
``a, b`` can undo. Blur and down-sampling remove fine detail, and noise scaled to the head's
own spread stays the same fraction of it after any rescaling: neither is a global gain.

Step 5 keeps the shift inside the head: background voxels (exactly 0) stay exactly 0 and
head voxels stay positive, so the nonzero set, and with it the crop box and the voxels the
z-score uses, are those of the source. Noise or blur leaking into the background would
change the crop and the normalisation instead of simulating a scanner.

The shift is simulated, not measured: it imitates kinds of differences seen between
scanners, with parameters chosen to be clearly visible, not fitted to any real site.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# robust maximum of head intensities for the contrast change: ignores a few hot voxels
ROBUST_MAX_PERCENTILE = 99.5
# head voxels pushed to or below 0 by noise are set to this fraction of the robust maximum,
# so that they stay head voxels
HEAD_FLOOR = 1e-3


@dataclass(frozen=True)
class AcquisitionShift:
    """Parameters of a simulated acquisition shift; the defaults are site ``"site-b"``.

    Attributes:
        gamma: contrast change, head intensities ``m * (x / m) ** gamma`` with ``m`` the
            robust maximum; 1 leaves them unchanged; > 0.
        bias_strength: the largest ``|log|`` of the multiplicative bias field over the head
            (0.3: gains from ``exp(-0.3) = 0.74`` to ``exp(0.3) = 1.35``); 0 for none.
        bias_order: highest polynomial degree of the log bias field; >= 1.
        noise_std: standard deviation of the added noise inside the head, as a fraction of
            the noiseless head intensities' standard deviation; 0 for none.
        downsample: in-plane acquisition grid coarser by this integer factor; 1 for none.
        blur_sigma: in-plane Gaussian blur in voxels before down-sampling; 0 for none.
    """

    gamma: float = 0.5
    bias_strength: float = 0.3
    bias_order: int = 3
    noise_std: float = 0.08
    downsample: int = 2
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a positive number, not {self.gamma!r}")
        for name in ("bias_strength", "noise_std", "blur_sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, not {value!r}")
        for name in ("bias_order", "downsample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


SITES: dict[str, AcquisitionShift] = {
    # lower grey/white contrast, a strong coil shading, noise and half the in-plane resolution
    "site-b": AcquisitionShift(),
}


def apply_shift(
    volume: np.ndarray, shift: AcquisitionShift, rng: np.random.Generator
) -> np.ndarray:
    """Apply a simulated acquisition shift to a skull-stripped volume, inside the head only.

    Args:
        volume: ``(X, Y, Z)`` non-negative intensities, slices along Z, background exactly 0.
        shift: the parameters.
        rng: the source of the bias field and the noise; the same state gives the same
            output.

    Returns:
        ``(X, Y, Z)`` float32, exactly 0 where ``volume`` is 0 and > 0 elsewhere.

    Raises:
        ValueError: ``volume`` is not 3D, holds NaN/Inf or negative values.
    """
    x = np.asarray(volume, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"volume must be (X, Y, Z), not of shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("volume holds NaN or Inf")
    if (x < 0).any():
        raise ValueError(f"volume holds negative values (min {x.min():g}); expected magnitudes")
    head = x != 0
    if not head.any():
        return np.zeros(x.shape, dtype=np.float32)
    peak = float(np.percentile(x[head], ROBUST_MAX_PERCENTILE))

    x = peak * (x / peak) ** shift.gamma
    if shift.bias_strength > 0:
        x = x * np.exp(_log_bias_field(x.shape, head, shift, rng))
    if shift.blur_sigma > 0:
        from scipy.ndimage import gaussian_filter

        x = gaussian_filter(x, sigma=(shift.blur_sigma, shift.blur_sigma, 0.0), mode="nearest")
    x = _resample(x, shift.downsample)
    if shift.noise_std > 0:
        coarse = _coarse_shape(x.shape, shift.downsample)
        noise = _resample(rng.standard_normal(coarse), shift.downsample, shape=x.shape)
        scale = shift.noise_std * float(x[head].std()) / max(float(noise[head].std()), 1e-12)
        x = x + scale * noise
    out = np.where(head, np.maximum(x, HEAD_FLOOR * peak), 0.0)
    return out.astype(np.float32)


def _log_bias_field(
    shape: tuple[int, int, int], head: np.ndarray, shift: AcquisitionShift, rng: np.random.Generator
) -> np.ndarray:
    """``f`` of the bias field ``exp(f)``: a random polynomial with ``max |f| =
    bias_strength`` over the head, centred there (a constant would be a global gain)."""
    # one length scale for all axes, so a thin slab gets a field as smooth along Z as in-plane
    half = max(shape) / 2.0
    coords = [(np.arange(n) - (n - 1) / 2.0) / half for n in shape]
    cx, cy, cz = np.meshgrid(*coords, indexing="ij", sparse=True)
    powers = [
        (i, j, k)
        for i in range(shift.bias_order + 1)
        for j in range(shift.bias_order + 1 - i)
        for k in range(shift.bias_order + 1 - i - j)
        if i + j + k > 0
    ]
    coeffs = rng.standard_normal(len(powers))
    # the first-degree terms span all three axes, so the sum has the full shape
    f = sum(c * cx**i * cy**j * cz**k for c, (i, j, k) in zip(coeffs, powers))
    f = f - f[head].mean()
    return f * (shift.bias_strength / max(float(np.abs(f[head]).max()), 1e-12))


def _coarse_shape(shape: tuple[int, ...], factor: int) -> tuple[int, int, int]:
    return (math.ceil(shape[0] / factor), math.ceil(shape[1] / factor), shape[2])


def _resample(x: np.ndarray, factor: int, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Without ``shape``: area average of ``x`` onto the grid ``factor`` times coarser
    in-plane, then bilinear back onto ``x``'s grid. With ``shape``: ``x`` is already on the
    coarse grid and is only resampled onto ``shape``."""
    if factor == 1:
        return x
    import torch
    import torch.nn.functional as F

    target = shape or x.shape
    # (X, Y, Z) -> (Z, 1, X, Y): slices as a batch of in-plane images
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0)))[:, None]
    if shape is None:
        t = F.interpolate(t, size=_coarse_shape(x.shape, factor)[:2], mode="area")
    t = F.interpolate(t, size=tuple(target[:2]), mode="bilinear", align_corners=False)
    return np.moveaxis(t[:, 0].numpy(), 0, -1)
