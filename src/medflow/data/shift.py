"""A simulated acquisition shift: the same anatomy as if scanned at another site.

:func:`apply_shift` maps a skull-stripped MR volume ``(X, Y, Z)`` (slices along Z) to what a
different scanner could have recorded, in this order (a component whose parameter is off
leaves the image as it is):

1. **contrast** (``gamma``): head intensities are divided by the volume's robust maximum
   ``m`` (99.5th percentile of its nonzero voxels), raised to ``gamma`` and multiplied back,
   as a sequence with other relaxation weighting would remap tissue intensities;
2. **contrast remap** (``remap_peak``): a second, non-power tissue curve, ``u -> u exp((1 -
   (u / p)^2) / 2)`` on ``u = x / m``, times ``m`` (:func:`remap_contrast`). It rises to its
   maximum ``p`` at ``u = p`` and falls beyond: tissue darker than ``p`` is brightened and
   compressed towards it, tissue brighter than ``p`` is darkened, in reversed order;
3. **bias field** (``bias_strength``, ``bias_order``): multiplied by ``exp(f)``, ``f`` a
   random polynomial of degree ``<= bias_order`` in the voxel coordinates (isotropic voxels
   assumed), centred over the head and scaled so ``max |f| = bias_strength`` there: a
   receive coil's smooth, spatially varying sensitivity;
4. **resolution** (``blur_sigma``, ``downsample``): an optional in-plane Gaussian blur (a
   wider point-spread function), then an area average over ``downsample x downsample``
   in-plane blocks (acquisition on a coarser in-plane grid) resampled back bilinearly onto
   the original grid;
5. **k-space and magnitude** (``kspace_fraction``, ``ghost_phase``, ``ghost_period``,
   ``rician_std``): each slice's in-plane k-space (numpy FFT) keeps only its central
   ``kspace_fraction`` along both axes, hard-truncated (Gibbs ringing at edges), and every
   ``ghost_period``-th phase-encode line (along :data:`PHASE_ENCODE_AXIS`, from a random
   first line) gets a phase error of ``ghost_phase`` times a random factor in [0.5, 1]:
   lines acquired while the head had moved, which replicate the slice ``ghost_period - 1``
   times at offsets of ``n / ghost_period`` voxels along the phase-encode axis (``n`` voxels
   long). White Gaussian noise of standard deviation ``rician_std`` times the image's robust
   maximum is added to the real and the imaginary channel of the complex image, and the
   magnitude is kept: Rician noise, whose mean exceeds the signal where the signal is low;
6. **noise** (``noise_std``): Gaussian noise drawn on the acquisition grid and resampled
   like the signal, so it is as spatially correlated as in a real low-resolution scan;
   scaled so that its standard deviation inside the head is ``noise_std`` times the
   standard deviation of the noiseless head intensities;
7. **mask**: multiplied by the input's nonzero mask, and head voxels floored at a small
   positive value. Ghosts and ringing that fall outside the head are removed with the rest
   of the background, as skull-stripping a real scan would remove them.

Why each component survives medflow's preprocessing (per-image z-score over nonzero voxels,
then a crop to the nonzero box): a z-score removes exactly one thing, a global gain and
offset ``a x + b``. ``x ** gamma`` is not affine for ``gamma != 1``, so it changes the
z-scored distance between grey and white matter (the robust maximum is only a global gain
and drops out). The remap is not even monotone: above ``p`` it reverses the order of
intensities, which no increasing map, affine or a power, can do, so tissue brighter than
``p`` in the source can come out darker than tissue below it. A bias field is a gain that
varies across the image, which no single pair ``a, b`` can undo. Blur, down-sampling and
k-space truncation remove fine detail; ghosts add a displaced copy of the anatomy onto the
anatomy; noise scaled to the head's own spread or robust maximum stays the same fraction of
it after any rescaling: none of them is a global gain.

Step 7 keeps the shift inside the head: background voxels (exactly 0) stay exactly 0 and
head voxels stay positive, so the nonzero set, and with it the crop box and the voxels the
z-score uses, are those of the source. Noise or blur leaking into the background would
change the crop and the normalisation instead of simulating a scanner.

The random draws come in component order (bias field, ghost lines, Rician noise, Gaussian
noise), and a component that is off draws nothing, so a site's output for a given rng state
does not depend on components it does not use.

The shift is simulated, not measured: it imitates kinds of differences seen between
scanners, with parameters chosen to be clearly visible, not fitted to any real site.

Sites (:data:`SITES`): ``"site-b"`` is a lower-contrast power curve, a coil's bias field,
half the in-plane resolution and correlated Gaussian noise, the family of appearance
augmentation that AlignFlow's strong baseline draws from (MONAI's contrast, bias-field,
smoothing, low-resolution and Gaussian-noise transforms). ``"site-c"`` is of another kind,
so that no method is tuned to one shift: the remap peaking at ``p = 0.95`` of the robust
maximum (grey matter is lifted towards white matter, and in the brightest quarter of white
matter, above ``p``, the order of intensities is reversed); k-space cut to its central half
along each in-plane axis (ringing at the head's edge and at tissue borders, a sinc
point-spread function instead of a smooth blur); every 4th phase-encode line off by 0.3-0.6
rad (three ghosts of 7-15 % of the signal, a quarter of the field of view apart along Y);
white Rician noise of 3 % of the robust maximum (0.24-0.31 of the head's intensity spread on
``mni152-tissue``'s test slabs, 2.5-3 times the baseline's largest Gaussian noise; its
Rician bias is under 1 % wherever the signal exceeds a third of the robust maximum, in over
99 % of head voxels there, and about 6 % at the darkest, near 0.09 of it). Its values were
picked to be clearly visible, not fitted and not checked with a trained segmenter; a
source-trained classifier of z-scored intensity alone (one voxel, no context) loses about as
much on it as on site-b (mean grey/white Dice 0.92 on the source, 0.64 on site-b, 0.59 on
site-c, test slabs of ``mni152-tissue``).
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
# in-plane axis along which k-space lines are phase-encoded (ghosts replicate along it):
# Y, anterior-posterior in the MNI152 template, a usual choice for axial brain scans
PHASE_ENCODE_AXIS = 1
# fields added after site-b, with their defaults (each turns its component off): left out by
# :meth:`AcquisitionShift.to_dict` when all are at them, so site-b's record reads as before
LATER_FIELDS = {
    "remap_peak": 0.0,
    "kspace_fraction": 1.0,
    "ghost_phase": 0.0,
    "ghost_period": 4,
    "rician_std": 0.0,
}


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
        remap_peak: ``p`` of the non-monotone contrast curve :func:`remap_contrast`, as a
            fraction of the robust maximum: where the remapped intensity peaks; 0 for none.
        kspace_fraction: central fraction of each slice's k-space kept along both in-plane
            axes, the rest zero-filled without a window (Gibbs ringing); in (0, 1], 1 for
            none.
        ghost_phase: largest phase error, in radians, of the corrupted phase-encode lines
            (each slice draws its own in ``[0.5, 1] x ghost_phase``); in [0, pi], 0 for none.
        ghost_period: every ``ghost_period``-th phase-encode line is corrupted, giving
            ``ghost_period - 1`` ghosts ``n / ghost_period`` voxels apart; >= 2.
        rician_std: standard deviation of the noise added to each of the real and imaginary
            channels before the magnitude, as a fraction of the noiseless image's robust
            maximum over the head (``1 / SNR`` of the brightest tissue); 0 for none.
    """

    gamma: float = 0.5
    bias_strength: float = 0.3
    bias_order: int = 3
    noise_std: float = 0.08
    downsample: int = 2
    blur_sigma: float = 0.0
    remap_peak: float = LATER_FIELDS["remap_peak"]
    kspace_fraction: float = LATER_FIELDS["kspace_fraction"]
    ghost_phase: float = LATER_FIELDS["ghost_phase"]
    ghost_period: int = LATER_FIELDS["ghost_period"]
    rician_std: float = LATER_FIELDS["rician_std"]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a positive number, not {self.gamma!r}")
        for name in ("bias_strength", "noise_std", "blur_sigma", "remap_peak", "rician_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, not {value!r}")
        for name in ("bias_order", "downsample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
        if not (math.isfinite(self.kspace_fraction) and 0 < self.kspace_fraction <= 1):
            raise ValueError(f"kspace_fraction must be in (0, 1], not {self.kspace_fraction!r}")
        if not (math.isfinite(self.ghost_phase) and 0 <= self.ghost_phase <= math.pi):
            raise ValueError(f"ghost_phase must be in [0, pi], not {self.ghost_phase!r}")
        period = self.ghost_period
        if isinstance(period, bool) or not isinstance(period, int) or period < 2:
            raise ValueError(f"ghost_period must be an integer >= 2, not {period!r}")

    @property
    def uses_kspace(self) -> bool:
        """Whether step 5 (k-space artefacts, complex noise, magnitude) runs."""
        return self.kspace_fraction < 1 or self.ghost_phase > 0 or self.rician_std > 0

    def to_dict(self) -> dict:
        """The fields; those of :data:`LATER_FIELDS` only when one of them is not at its
        default, so a shift without the later components has the record it had before they
        existed; ``AcquisitionShift(**d)`` inverts it."""
        record = asdict(self)
        if all(record[k] == v for k, v in LATER_FIELDS.items()):
            for k in LATER_FIELDS:
                del record[k]
        return record


SITES: dict[str, AcquisitionShift] = {
    # lower grey/white contrast, a strong coil shading, noise and half the in-plane resolution
    "site-b": AcquisitionShift(),
    # another kind: a non-monotone tissue curve, Gibbs ringing, motion ghosts, Rician noise;
    # none of site-b's gamma, bias field, coarser grid or correlated noise (module docstring)
    "site-c": AcquisitionShift(
        gamma=1.0,
        bias_strength=0.0,
        noise_std=0.0,
        downsample=1,
        remap_peak=0.95,
        kspace_fraction=0.5,
        ghost_phase=0.6,
        ghost_period=4,
        rician_std=0.03,
    ),
}


def apply_shift(
    volume: np.ndarray, shift: AcquisitionShift, rng: np.random.Generator
) -> np.ndarray:
    """Apply a simulated acquisition shift to a skull-stripped volume, inside the head only.

    Args:
        volume: ``(X, Y, Z)`` non-negative intensities, slices along Z, background exactly 0.
        shift: the parameters.
        rng: the source of the bias field, the ghost lines and the noise; the same state
            gives the same output.

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
    if shift.remap_peak > 0:
        x = peak * remap_contrast(x / peak, shift.remap_peak)
    if shift.bias_strength > 0:
        x = x * np.exp(_log_bias_field(x.shape, head, shift, rng))
    if shift.blur_sigma > 0:
        from scipy.ndimage import gaussian_filter

        x = gaussian_filter(x, sigma=(shift.blur_sigma, shift.blur_sigma, 0.0), mode="nearest")
    x = _resample(x, shift.downsample)
    if shift.uses_kspace:
        x = _magnitude_acquisition(x, head, shift, rng)
    if shift.noise_std > 0:
        coarse = _coarse_shape(x.shape, shift.downsample)
        noise = _resample(rng.standard_normal(coarse), shift.downsample, shape=x.shape)
        scale = shift.noise_std * float(x[head].std()) / max(float(noise[head].std()), 1e-12)
        x = x + scale * noise
    out = np.where(head, np.maximum(x, HEAD_FLOOR * peak), 0.0)
    return out.astype(np.float32)


def remap_contrast(u: np.ndarray, peak: float) -> np.ndarray:
    """The non-monotone tissue curve ``u exp((1 - (u / peak)^2) / 2)``, any shape.

    On intensities ``u`` normalised by their robust maximum, it is 0 at 0, has slope
    ``exp(1/2) = 1.65`` there, rises to its maximum ``peak`` at ``u = peak`` and falls as a
    Gaussian beyond: darker tissue is brightened and its spacing compressed towards ``peak``,
    tissue brighter than ``peak`` is darkened in reversed order. A power ``u ** gamma`` is
    increasing for every ``gamma > 0``, so it keeps the order that this curve reverses, and
    its slope at the robust maximum is ``gamma``, never the 0 this curve has at ``peak``.

    Args:
        u: intensities over the robust maximum, any shape, >= 0.
        peak: where the curve peaks, > 0.

    Returns:
        The remapped intensities, ``u``'s shape, in ``[0, peak]``.
    """
    return u * np.exp(0.5 * (1.0 - (u / peak) ** 2))


def _magnitude_acquisition(
    x: np.ndarray, head: np.ndarray, shift: AcquisitionShift, rng: np.random.Generator
) -> np.ndarray:
    """Step 5: ``(X, Y, Z)`` intensities through each slice's in-plane k-space (truncation,
    phase-encode lines with phase errors), complex white noise, magnitude; ``(X, Y, Z)``."""
    z = x.astype(np.complex128)
    if shift.kspace_fraction < 1 or shift.ghost_phase > 0:
        k = np.fft.fft2(z, axes=(0, 1))
        if shift.kspace_fraction < 1:
            # the same central band along both axes; |f| <= fraction / 2 keeps it symmetric
            keep = [np.abs(np.fft.fftfreq(n)) <= shift.kspace_fraction / 2 for n in x.shape[:2]]
            k = k * (keep[0][:, None] & keep[1][None, :])[:, :, None]
        if shift.ghost_phase > 0:
            k = k * _ghost_phases(x.shape, shift, rng)
        z = np.fft.ifft2(k, axes=(0, 1))
    if shift.rician_std > 0:
        # the robust maximum of the noiseless magnitude: the SNR of the brightest tissue
        sigma = shift.rician_std * float(np.percentile(np.abs(z)[head], ROBUST_MAX_PERCENTILE))
        real, imag = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
        z = z + sigma * (real + 1j * imag)
    return np.abs(z)


def _ghost_phases(
    shape: tuple[int, int, int], shift: AcquisitionShift, rng: np.random.Generator
) -> np.ndarray:
    """Per-line k-space factors broadcastable to ``shape``: ``exp(i phi_z)`` on the lines
    ``ky = o_z (mod ghost_period)`` of slice ``z``, 1 elsewhere; ``o_z`` and ``phi_z`` (in
    ``[0.5, 1] x ghost_phase``) drawn per slice, offsets first."""
    n, depth = shape[PHASE_ENCODE_AXIS], shape[2]
    offsets = rng.integers(shift.ghost_period, size=depth)
    phases = shift.ghost_phase * rng.uniform(0.5, 1.0, size=depth)
    # signed line index in acquisition order: the ghosts repeat every n / ghost_period voxels
    # even where n is not a multiple of the period (then between voxels, interpolated)
    ky = np.round(np.fft.fftfreq(n) * n).astype(int)
    hit = (ky[:, None] - offsets[None, :]) % shift.ghost_period == 0  # (n, Z)
    factors = np.where(hit, np.exp(1j * phases)[None, :], 1.0)
    view = [1, 1, depth]
    view[PHASE_ENCODE_AXIS] = n
    return factors.reshape(view)


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
