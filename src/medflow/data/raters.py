"""Simulated raters: several annotations of one volume with a known per-voxel label distribution.

Rater ``r`` draws white Gaussian noise ``w_r``, smooths it with a Gaussian kernel ``G`` of
standard deviation ``correlation_mm`` (converted to voxels per axis from the spacing) and
divides by the standard deviation that smoothing gives unit white noise at that voxel:

    z_r(x) = (G * w_r)(x) / sqrt(Var[(G * w)(x)]),    u_r(x) = Phi(z_r(x)),

where ``Phi`` is the standard normal CDF. ``Var[(G * w)(x)]`` is the sum of the squared weights
with which the (boundary-reflected) filter mixes the noise into voxel ``x``, computed from the
filter itself (:func:`field_variance`), never from the draw. So ``z_r(x)`` is exactly
``N(0, 1)`` and ``u_r(x)`` exactly ``U(0, 1)`` at every voxel, whatever the draw and however
close to the border. With class probabilities ``p_k(x)`` (``k = 0`` background), the label is

    1 if u < p_1,   2 if p_1 <= u < p_1 + p_2,   ...,   0 (background) if u >= p_1 + ... + p_{K-1},

so ``P(label_r(x) = k) = p_k(x)`` exactly: the marginal at every voxel is the given
distribution, and the frequencies over many raters converge to it at the binomial rate.

What the smoothing adds is coherence. Neighbouring voxels share most of their noise, so a
rater's ``u`` varies slowly: where it is low, the rater takes the earlier classes (grey
matter before white matter before background) wherever they are plausible, i.e. draws tissue
and grey matter generously; where it is high, conservatively. A rater is thus locally liberal
or locally conservative, and its boundaries are smooth contours of the probability maps
rather than salt-and-pepper noise. ``correlation_mm`` is the scale of that behaviour: the
field's correlation between two points ``d`` mm apart is ``exp(-d^2 / (4 L^2))`` away from the
border (the kernel convolved with itself), i.e. ``1/e`` at ``d = 2 L``. ``correlation_mm = 0``
gives independent voxels; a very long length gives raters that each apply one global
threshold to the probability maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d
from scipy.special import ndtr

# the boundary handling and kernel support of the smoothing; field_variance uses the same
MODE = "reflect"
TRUNCATE = 4.0
# how far probabilities may stray from [0, 1] and from summing to 1 (float32 maps)
PROB_TOL = 1e-4
# below this many voxels of standard deviation scipy does not filter an axis at all
_NO_SMOOTHING = 1e-15


def simulate_raters(
    probs: np.ndarray,
    n: int,
    correlation_mm: float,
    spacing: Sequence[float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw ``n`` spatially coherent annotations whose per-voxel label law is ``probs``.

    Args:
        probs: ``(K, X, Y, Z)`` (or any number of spatial axes) class probabilities, class 0
            background, summing to 1 over ``K`` at every voxel.
        n: number of raters, at least 1.
        correlation_mm: standard deviation of the smoothing kernel in mm; 0 gives
            independent voxels.
        spacing: voxel size in mm per spatial axis.
        rng: the source of every rater's noise.

    Returns:
        ``(n, X, Y, Z)`` uint8 label maps in ``0..K-1``.

    Raises:
        ValueError: ``probs`` is not a distribution over classes at some voxel (the value and
            the voxel are named), or ``n``, ``correlation_mm`` or ``spacing`` are bad.
    """
    probs = check_probabilities(probs)
    shape = probs.shape[1:]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of raters must be a positive integer, got {n!r}")
    sigmas = voxel_sigmas(correlation_mm, spacing, len(shape))
    # u < bounds[0] -> class 1, bounds[0] <= u < bounds[1] -> class 2, ..., else background
    bounds = np.cumsum(probs[1:], axis=0, dtype=np.float64)
    out = np.empty((n, *shape), dtype=np.uint8)
    for r in range(n):
        u = ndtr(unit_variance_field(rng.standard_normal(shape), sigmas))
        out[r] = labels_from_uniform(u, bounds)
    return out


def unit_variance_field(noise: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """Smooth white noise and scale it to unit variance at every voxel.

    The scale is the filter's (:func:`field_variance`), not the draw's, so the map from
    ``noise`` to the field is linear and fixed: a unit white ``noise`` gives exactly
    ``N(0, 1)`` at every voxel.

    Args:
        noise: ``(X, Y, Z)`` unit white Gaussian noise.
        sigmas: kernel standard deviation in voxels per axis (0: that axis unsmoothed).

    Returns:
        ``(X, Y, Z)`` float64 field.
    """
    if not any(s > _NO_SMOOTHING for s in sigmas):
        return np.asarray(noise, dtype=np.float64)
    smoothed = gaussian_filter(
        np.asarray(noise, dtype=np.float64), sigmas, mode=MODE, truncate=TRUNCATE
    )
    return smoothed / np.sqrt(field_variance(noise.shape, sigmas))


def check_probabilities(probs: np.ndarray) -> np.ndarray:
    """``probs`` ``(K, ...)`` as float64 with round-off below zero clipped away.

    Raises:
        ValueError: fewer than two classes or spatial axes missing, a value outside
            ``[0, 1]`` or not finite, or a voxel whose classes do not sum to 1 (within
            ``PROB_TOL``), naming the value and its voxel.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim < 2 or probs.shape[0] < 2:
        raise ValueError(
            f"probs must have shape (K, X, Y, Z) with K >= 2 classes, got {probs.shape}"
        )
    bad = ~np.isfinite(probs) | (probs < -PROB_TOL) | (probs > 1 + PROB_TOL)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"probs must lie in [0, 1]; found {probs[where]} at class {where[0]}, voxel {where[1:]}"
        )
    total = probs.sum(axis=0)
    off = np.abs(total - 1.0) > PROB_TOL
    if off.any():
        where = tuple(int(i) for i in np.argwhere(off)[0])
        raise ValueError(f"probs must sum to 1 over classes; voxel {where} sums to {total[where]}")
    return np.clip(probs, 0.0, None)


def voxel_sigmas(correlation_mm: float, spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """The kernel's standard deviation in voxels along each of ``ndim`` axes.

    Raises:
        ValueError: ``correlation_mm`` negative or not finite, or ``spacing`` not ``ndim``
            positive sizes.
    """
    if not np.isfinite(correlation_mm) or correlation_mm < 0:
        raise ValueError(f"correlation_mm must be a finite length >= 0, got {correlation_mm}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be {ndim} positive voxel sizes in mm, got {spacing}")
    return tuple(correlation_mm / s for s in spacing)


def field_variance(shape: Sequence[int], sigmas: Sequence[float]) -> np.ndarray:
    """Per-voxel variance of unit white noise after the smoothing :func:`simulate_raters` uses.

    The filter is separable, a Kronecker product of 1D filter matrices ``A_i``, so the
    variance ``diag(A A^T)`` is the outer product of the per-axis ``diag(A_i A_i^T)``; each
    ``A_i`` is the 1D filter applied to the identity (one delta per column), with the same
    boundary mode and truncation, so the border (where reflection folds the kernel) is exact.

    Args:
        shape: spatial shape ``(X, Y, Z)``.
        sigmas: kernel standard deviation in voxels per axis.

    Returns:
        ``shape`` float64 variances; all ones where no axis is smoothed.
    """
    variance = np.ones((), dtype=np.float64)
    for size, sigma in zip(shape, sigmas, strict=True):
        if sigma > _NO_SMOOTHING:
            matrix = gaussian_filter1d(np.eye(size), sigma, axis=0, mode=MODE, truncate=TRUNCATE)
            axis_var = (matrix**2).sum(axis=1)
        else:
            axis_var = np.ones(size)
        variance = np.multiply.outer(variance, axis_var)
    return variance


def labels_from_uniform(u: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Class 1 where ``u < bounds[0]``, class ``k`` where ``bounds[k-2] <= u < bounds[k-1]``,
    background (0) where ``u >= bounds[-1]``.

    Args:
        u: ``(X, Y, Z)`` values in ``[0, 1)``.
        bounds: ``(K-1, X, Y, Z)`` cumulative probabilities of classes ``1..K-1``.

    Returns:
        ``(X, Y, Z)`` uint8 labels.
    """
    k = bounds.shape[0] + 1
    interval = np.zeros(u.shape, dtype=np.uint8)
    for bound in bounds:
        interval += u >= bound
    # interval j < K-1 is class j+1; the last interval, K-1, is background
    interval += 1
    interval[interval == k] = 0
    return interval
