"""Scores of a set of predicted samples against a set of references (several raters per case).

All functions are pure numpy on integer label maps of any shape (2D ``(H, W)``, 3D
``(X, Y, Z)``, ...); ``classes`` are the foreground label values to score.

Distance (Kohl et al. 2018, PHiSeg's LIDC evaluation): ``d(a, b) = 1 - IoU(a, b)``, averaged
over the foreground classes. A class empty in both maps has IoU 1 (``d`` 0): two raters who both
see no lesion agree; a class empty in exactly one map has IoU 0 (``d`` 1). This is the policy of
:mod:`medflow.metrics.overlap`.

Generalised energy distance, ``GED^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]`` over samples
``S`` and references ``Y``, is estimated over *all* pairs, ``i = j`` included (a V-statistic,
as the published Prob. U-Net and PHiSeg code computes it): ``E[d(S, S')]`` is the mean of the
full ``S x S`` matrix, whose diagonal is 0. So GED is defined for one sample and is 0 when
samples and references are the same set. It is never negative: IoU of masks is a positive
definite kernel (Tanimoto's), so ``1 - IoU`` is conditionally negative definite, and the
all-pairs estimate is a quadratic form in it with weights that sum to 0. The unbiased
``i != j`` estimate can go below 0. :func:`diversity` is the ``i != j`` mean,
``S / (S - 1)`` times the GED term.

Calibration of a fused soft mask ``probs (K, ...)`` against the true class frequencies
``target (K, ...)`` is measured inside ``region`` only; :func:`soft_region` gives the region
the evaluation uses, every voxel that is not certainly background (``target[0] < 1``), so the
vast certain background does not dilute the scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from medflow.metrics.overlap import confusion, iou

# voxels per block of the pairwise count: float32 sums of 0/1 stay exact below 2**24
_BLOCK = 1 << 18


@dataclass(frozen=True)
class GEDResult:
    """Generalised energy distance and its three terms (all-pairs means).

    Attributes:
        ged2: ``2 * cross - sample_diversity - ref_diversity``, the squared GED.
        cross: ``E[d(S, Y)]``, mean distance of every sample to every reference.
        sample_diversity: ``E[d(S, S')]`` over all ``S x S`` pairs, ``i = j`` included.
        ref_diversity: ``E[d(Y, Y')]`` over all ``R x R`` pairs, ``i = j`` included.
    """

    ged2: float
    cross: float
    sample_diversity: float
    ref_diversity: float


def _check_classes(classes: Sequence[int]) -> list[int]:
    values = [int(c) for c in classes]
    if not values:
        raise ValueError("classes is empty; name at least one foreground label value")
    return values


def iou_distance(a: np.ndarray, b: np.ndarray, classes: Sequence[int]) -> float:
    """``1 - IoU(a, b)`` averaged over ``classes``; a class empty in both maps counts IoU 1.

    Args:
        a: integer label map, any shape.
        b: integer label map, same shape.
        classes: foreground label values to score.

    Raises:
        ValueError: shapes differ or ``classes`` is empty.
    """
    values = _check_classes(classes)
    return 1.0 - sum(iou(*confusion(a, b, c)) for c in values) / len(values)


def _stack(maps: Sequence[np.ndarray], shape: tuple[int, ...] | None) -> np.ndarray:
    """``(N, V)`` flattened copy of ``maps``; ValueError if empty or a shape differs."""
    if len(maps) == 0:
        raise ValueError("need at least one label map")
    arrays = [np.asarray(m) for m in maps]
    shape = arrays[0].shape if shape is None else shape
    for i, arr in enumerate(arrays):
        if arr.shape != shape:
            raise ValueError(f"label map {i} has shape {arr.shape}, expected {shape}")
    return np.stack([arr.reshape(-1) for arr in arrays])


def distance_matrix(
    a: Sequence[np.ndarray], b: Sequence[np.ndarray], classes: Sequence[int]
) -> np.ndarray:
    """``(len(a), len(b))`` matrix of :func:`iou_distance` between every pair of maps.

    Counts every pair's intersections at once with a matrix product (in blocks of voxels),
    which a GED over 16 samples and 8 raters needs: 448 distances per case.

    Raises:
        ValueError: a set is empty, the maps differ in shape, or ``classes`` is empty.
    """
    values = _check_classes(classes)
    same = b is a  # a set against itself: one comparison per block, not two
    la = _stack(a, None)
    lb = la if same else _stack(b, np.asarray(a[0]).shape)
    iou_sum = np.zeros((len(la), len(lb)))
    for c in values:
        inter = np.zeros((len(la), len(lb)))
        na, nb = np.zeros(len(la)), np.zeros(len(lb))
        for start in range(0, la.shape[1], _BLOCK):
            ma = la[:, start : start + _BLOCK] == c
            mb = ma if same else lb[:, start : start + _BLOCK] == c
            fa = ma.astype(np.float32)
            inter += fa @ (fa if same else mb.astype(np.float32)).T
            na += np.count_nonzero(ma, axis=1)
            nb += np.count_nonzero(mb, axis=1)
        union = na[:, None] + nb[None, :] - inter
        # both empty: union 0, IoU 1 (the policy of overlap.iou)
        iou_sum += np.divide(inter, union, out=np.ones_like(union), where=union > 0)
    return 1.0 - iou_sum / len(values)


def pairwise_distances(
    samples: Sequence[np.ndarray], refs: Sequence[np.ndarray], classes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three distance matrices of a GED, ``(S, R)``, ``(S, S)`` and ``(R, R)``, from one
    pass over the maps of both sets.

    Raises:
        ValueError: a set is empty, shapes differ, or ``classes`` is empty.
    """
    if len(samples) == 0 or len(refs) == 0:
        raise ValueError("need at least one label map in each set")
    both = [*samples, *refs]
    d = distance_matrix(both, both, classes)
    n = len(samples)
    return d[:n, n:], d[:n, :n], d[n:, n:]


def ged_from_distances(d_sy: np.ndarray, d_ss: np.ndarray, d_yy: np.ndarray) -> GEDResult:
    """GED from the three distance matrices ``(S, R)``, ``(S, S)`` and ``(R, R)``."""
    cross, ss, yy = float(d_sy.mean()), float(d_ss.mean()), float(d_yy.mean())
    return GEDResult(ged2=2 * cross - ss - yy, cross=cross, sample_diversity=ss, ref_diversity=yy)


def ged(
    samples: Sequence[np.ndarray], refs: Sequence[np.ndarray], classes: Sequence[int]
) -> GEDResult:
    """Squared generalised energy distance between samples and references (module docstring).

    Args:
        samples: ``S >= 1`` predicted label maps of one case, all of one shape.
        refs: ``R >= 1`` reference label maps of the case, same shape.
        classes: foreground label values.

    Raises:
        ValueError: a set is empty, shapes differ, or ``classes`` is empty.
    """
    return ged_from_distances(*pairwise_distances(samples, refs, classes))


def diversity_from_distances(d_ss: np.ndarray) -> float:
    """Mean of the off-diagonal entries of a square distance matrix; 0 for a ``1 x 1``."""
    n = len(d_ss)
    return 0.0 if n < 2 else float((d_ss.sum() - np.trace(d_ss)) / (n * (n - 1)))


def ged_unbiased_from_distances(d_sy: np.ndarray, d_ss: np.ndarray, d_yy: np.ndarray) -> float:
    """GED² with both within-set terms over ``i != j`` (the U-statistic): 0 in expectation
    when samples and references come from one distribution, where the all-pairs
    :func:`ged_from_distances` is positive and, at small ``S``, rewards samples that all sit
    at the mean. Needs at least two samples and two references."""
    if len(d_ss) < 2 or len(d_yy) < 2:
        raise ValueError("the unbiased GED needs at least two samples and two references")
    cross = float(np.asarray(d_sy).mean())
    return 2.0 * cross - diversity_from_distances(d_ss) - diversity_from_distances(d_yy)


def diversity(samples: Sequence[np.ndarray], classes: Sequence[int]) -> float:
    """Mean pairwise distance ``d`` between samples over ``i != j``; 0 for one sample.

    Raises:
        ValueError: no samples, shapes differ, or ``classes`` is empty.
    """
    samples = list(samples)
    return diversity_from_distances(distance_matrix(samples, samples, classes))


def matched_iou_from_distances(d_sy: np.ndarray) -> float:
    """Hungarian-matched IoU from the ``(S, R)`` distance matrix (see :func:`matched_iou`)."""
    s, r = d_sy.shape
    n = s * r // math.gcd(s, r)
    # row i of the replicated set is sample i % s, column j reference j % r
    cost = d_sy[np.arange(n) % s][:, np.arange(n) % r]
    rows, cols = linear_sum_assignment(cost)
    return float(1.0 - cost[rows, cols].mean())


def matched_iou(
    samples: Sequence[np.ndarray], refs: Sequence[np.ndarray], classes: Sequence[int]
) -> float:
    """Mean IoU ``1 - d`` of a one-to-one matching of samples to references of least cost.

    Both sets are replicated to ``lcm(S, R)`` members, so every sample is matched
    ``lcm / S`` times and every reference ``lcm / R`` times, and the matching of least total
    ``d`` (``scipy.optimize.linear_sum_assignment``) is scored by its mean ``1 - d``. One
    sample is thus compared with every reference once.

    Raises:
        ValueError: a set is empty, shapes differ, or ``classes`` is empty.
    """
    return matched_iou_from_distances(distance_matrix(samples, refs, classes))


# ------------------------------------------------------------------------------ calibration


def _check_soft(probs: np.ndarray, target: np.ndarray, region: np.ndarray) -> tuple:
    probs, target, region = np.asarray(probs), np.asarray(target), np.asarray(region)
    if probs.shape != target.shape:
        raise ValueError(f"probs shape {probs.shape} differs from target shape {target.shape}")
    if probs.ndim < 2 or probs.shape[0] < 2:
        raise ValueError(f"expected probabilities (K >= 2, ...), got shape {probs.shape}")
    if region.shape != probs.shape[1:] or region.dtype != bool:
        raise ValueError(
            f"region must be a boolean mask of shape {probs.shape[1:]}, got {region.dtype} "
            f"{region.shape}"
        )
    return probs[:, region].astype(np.float64), target[:, region].astype(np.float64)


def soft_region(target: np.ndarray) -> np.ndarray:
    """Voxels whose true class distribution ``target (K, ...)`` is not certain background:
    ``target[0] < 1``, not dilated."""
    return np.asarray(target)[0] < 1


def soft_ece(probs: np.ndarray, target: np.ndarray, region: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error against soft labels, mean over foreground classes.

    For each foreground class ``k`` (channels ``1..K-1``), the region's voxels are put into
    ``bins`` equal-width bins of their predicted ``p_k`` (bin ``min(floor(p_k * bins),
    bins - 1)``, so ``p = 1`` falls in the last) and
    ``ECE_k = sum_b (n_b / n) |mean_b p_k - mean_b q_k|``, ``q`` being the true frequency.
    An empty region scores 0 (nothing inside it to be miscalibrated on).

    Args:
        probs: predicted class probabilities ``(K, ...)``.
        target: true class probabilities ``(K, ...)``.
        region: boolean mask ``(...)`` of the voxels to score.
        bins: number of bins, at least 1.

    Raises:
        ValueError: shapes disagree, ``K < 2`` or ``bins < 1``.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    p, q = _check_soft(probs, target, region)
    n = p.shape[1]
    if n == 0:
        return 0.0
    per_class = []
    for pk, qk in zip(p[1:], q[1:]):
        index = np.minimum((np.clip(pk, 0, 1) * bins).astype(np.int64), bins - 1)
        count = np.bincount(index, minlength=bins)
        gap = np.bincount(index, weights=pk, minlength=bins) - np.bincount(
            index, weights=qk, minlength=bins
        )
        # sum_b (n_b / n) |sum_b p / n_b - sum_b q / n_b| = sum_b |sum_b (p - q)| / n
        per_class.append(float(np.abs(gap[count > 0]).sum() / n))
    return float(np.mean(per_class))


def brier(probs: np.ndarray, target: np.ndarray, region: np.ndarray) -> float:
    """Mean over the region's voxels of ``sum_k (p_k - q_k)^2``, background included; 0 for
    an empty region.

    Raises:
        ValueError: shapes disagree or ``K < 2``.
    """
    p, q = _check_soft(probs, target, region)
    return 0.0 if p.shape[1] == 0 else float(((p - q) ** 2).sum(0).mean())


def prob_mae(probs: np.ndarray, target: np.ndarray, region: np.ndarray) -> float:
    """Mean ``|p_k - q_k|`` over the region's voxels and the foreground classes ``1..K-1``;
    0 for an empty region.

    Raises:
        ValueError: shapes disagree or ``K < 2``.
    """
    p, q = _check_soft(probs, target, region)
    return 0.0 if p.shape[1] == 0 else float(np.abs(p[1:] - q[1:]).mean())


def rater_floor(
    refs: Sequence[np.ndarray],
    fresh: Sequence[np.ndarray],
    classes: Sequence[int],
    samples: Sequence[int] = (1, 4, 16),
) -> dict[int, GEDResult]:
    """GED of the first ``S`` fresh raters against the references, for each ``S``.

    Fresh raters are independent draws from the distribution the references came from, so
    this is the GED a perfect model would score with ``S`` samples (it is not 0: a finite
    set of draws differs from another).

    Args:
        refs: the ``R`` reference label maps of a case.
        fresh: at least ``max(samples)`` further label maps drawn like the references.
        classes: foreground label values.
        samples: the sample counts ``S`` to score.

    Returns:
        ``{S: GEDResult}`` in the order of ``samples``.

    Raises:
        ValueError: an ``S`` is below 1 or above ``len(fresh)``, shapes differ, or
            ``classes`` is empty.
    """
    for s in samples:
        if not 1 <= s <= len(fresh):
            raise ValueError(f"sample count {s} must be in 1..{len(fresh)} (the fresh raters)")
    n = max(samples, default=0)
    if n == 0:
        raise ValueError("samples is empty; name at least one sample count")
    d_sy, d_ss, d_yy = pairwise_distances(fresh[:n], refs, classes)
    return {s: ged_from_distances(d_sy[:s], d_ss[:s, :s], d_yy) for s in samples}
