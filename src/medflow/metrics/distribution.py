"""Distances between two sets of feature vectors: squared MMD (a training signal) and the
Fréchet distance (an evaluation number, FID's formula on any features).

Both take feature matrices ``x`` of shape ``(N, D)`` and ``y`` of shape ``(M, D)``: one row per
image, produced by an encoder such as :class:`medflow.synthesis.reward.FeatureEncoder`.

* :func:`mmd2` is differentiable in ``x`` and defined for a single reference (``M = 1``), so it
  can serve as the few-shot alignment reward.
* :func:`frechet_distance` fits a Gaussian to each set; it needs ``N, M >= 2`` and is a float,
  not a loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# multiples of the median pairwise distance used as kernel widths when none are given: one
# fixed width is blind to differences much smaller or much larger than itself, and a spread
# of two octaves either side covers both a nearly aligned and a far-off generator
MEDIAN_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)


def _check_pair(x: torch.Tensor, y: torch.Tensor, min_rows: int) -> None:
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"features must be (N, D) matrices, got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < min_rows or y.shape[0] < min_rows:
        raise ValueError(
            f"need at least {min_rows} row(s) in each set, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )


def median_distance(z: torch.Tensor) -> torch.Tensor:
    """Median Euclidean distance over the distinct pairs of rows of ``z`` ``(N, D)``, ``N >= 2``.

    Computed without gradient: a kernel width that moved with the samples would let the
    optimiser lower the MMD by inflating the width rather than by moving the samples.
    """
    with torch.no_grad():
        d2 = _sq_distances(z, z)
        i, j = torch.triu_indices(len(z), len(z), offset=1, device=z.device)
        return d2[i, j].sqrt().median()


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # |a|^2 + |b|^2 - 2 a.b: memory N x M instead of N x M x D for the plain differences;
    # the clamp removes the small negatives that cancellation leaves for (near-)equal rows
    sq = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.T
    return sq.clamp_min(0.0)


def mmd2(
    x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] | None = None
) -> torch.Tensor:
    """Squared maximum mean discrepancy between the samples ``x`` and ``y``.

    The kernel is a sum of Gaussians ``k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2))``, characteristic
    (MMD = 0 only for equal distributions) and, with several widths, sensitive at several
    scales (Li et al. 2015, "Generative moment matching networks"). The estimator is the
    biased V-statistic

        ``MMD^2 = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j)``

    with the diagonal terms kept. It is the squared RKHS distance between the two empirical
    mean embeddings, so it is ``>= 0`` up to rounding, is exactly 0 for equal sets, and is
    defined for a single reference (``M = 1``: its ``k(y, y)`` term is a constant). The unbiased
    U-statistic drops the diagonals, which needs ``M >= 2`` and can go negative: a poor loss
    for a few-shot reference set. The price is small: the diagonal terms ``k(a, a)`` are
    constants, so the only change to the gradient is that the within-``x`` repulsion is
    weighted ``(N - 1) / N`` of the U-statistic's, a slight pull toward a narrower ``x`` that
    fades with the batch size.

    Args:
        x: samples ``(N, D)``, e.g. features of generated images; the gradient flows to them.
        y: samples ``(M, D)``, e.g. features of the reference images.
        bandwidths: kernel widths ``s`` in feature units. ``None``: the widths are
            :data:`MEDIAN_MULTIPLES` times the median pairwise distance of ``x`` and ``y``
            pooled, computed without gradient (see :func:`median_distance`).

    Returns:
        A scalar tensor, differentiable in ``x`` (and ``y``).

    Raises:
        ValueError: ``x`` or ``y`` is not a matrix, their feature dimensions differ, either is
            empty, or a bandwidth is not positive.
    """
    _check_pair(x, y, min_rows=1)
    z = torch.cat([x, y])
    if bandwidths is None:
        median = median_distance(z)
        # all pooled points equal: every width gives MMD = 0, any positive one will do
        median = torch.where(median > 0, median, torch.ones_like(median))
        widths = median * torch.tensor(MEDIAN_MULTIPLES, dtype=z.dtype, device=z.device)
    else:
        widths = torch.as_tensor(tuple(bandwidths), dtype=z.dtype, device=z.device)
        if widths.ndim != 1 or len(widths) == 0 or not bool((widths > 0).all()):
            raise ValueError(f"bandwidths must be positive numbers, got {tuple(bandwidths)}")
    d2 = _sq_distances(z, z)
    k = torch.exp(-d2[None] / (2.0 * widths[:, None, None] ** 2)).sum(0)
    n = len(x)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()


def frechet_distance(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to ``x`` and ``y`` (FID's formula).

    ``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^(1/2) S_y S_x^(1/2))^(1/2))`` with sample means
    and unbiased covariances. The matrix square roots come from symmetric eigen-decompositions
    in float64 (negative eigenvalues from rounding clipped to 0), so rank-deficient
    covariances (``N < D``) need no special case, unlike ``scipy.linalg.sqrtm`` of the
    non-symmetric ``S_x S_y``, which can return complex or non-finite values there.
    ``S_x^(1/2) S_y S_x^(1/2)`` has the eigenvalues of ``S_x S_y``, so the trace is FID's.

    Args:
        x: features ``(N, D)``, ``N >= 2``; a tensor or anything ``torch.as_tensor`` takes.
        y: features ``(M, D)``, ``M >= 2``.
        eps: added to both covariance diagonals (as pytorch-fid does for near-singular
            ones); the same shift on both sides keeps the distance of equal sets at 0.

    Returns:
        The distance, a float ``>= 0`` (0 up to rounding for identical sets).

    Raises:
        ValueError: bad shapes (see :func:`mmd2`), fewer than 2 rows, or ``eps < 0``.
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    y = torch.as_tensor(y).detach().to("cpu", torch.float64)
    _check_pair(x, y, min_rows=2)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    cov_x = torch.cov(x.T).reshape(eye.shape) + eps * eye
    cov_y = torch.cov(y.T).reshape(eye.shape) + eps * eye
    root_x = _psd_sqrt(cov_x)
    cross = _psd_eigenvalues(root_x @ cov_y @ root_x).sqrt().sum()
    dist = (mu_x - mu_y).pow(2).sum() + torch.trace(cov_x) + torch.trace(cov_y) - 2.0 * cross
    # rounding can leave a tiny negative for (near-)identical sets
    return max(float(dist), 0.0)


def _psd_eigenvalues(a: torch.Tensor) -> torch.Tensor:
    # symmetrise first: products like root @ cov @ root are symmetric only up to rounding
    return torch.linalg.eigvalsh((a + a.T) / 2.0).clamp_min(0.0)


def _psd_sqrt(a: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((a + a.T) / 2.0)
    return (vecs * vals.clamp_min(0.0).sqrt()) @ vecs.T
