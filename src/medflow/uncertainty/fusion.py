"""Fuse ``S`` soft masks, one per noise draw, into one prediction.

Samples arrive one at a time (``(N, K, H, W)`` class probabilities each) and are folded into
running statistics, so memory does not grow with ``S``. The mean uses Welford's update: a
sample equal to the running mean adds exactly zero to the sum of squares, so identical
samples give a variance of exactly 0, not rounding noise.

Two fusions decode a label map:

* ``"mean"``: argmax of the mean soft mask (the default, and what ``predict_probs`` does);
* ``"vote"``: the class most samples choose (argmax per sample, then a majority vote), ties
  broken by the mean soft mask.

Either way the uncertainty maps and the calibration use the mean soft mask: it is the
predictive distribution, and a vote share is a coarser estimate of it.
"""

from __future__ import annotations

import torch

FUSIONS = ("mean", "vote")


class SampleStats:
    """Running per-pixel statistics of soft masks ``(N, K, H, W)`` from independent samples.

    Attributes:
        count: samples added so far.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self._votes: torch.Tensor | None = None

    def add(self, probs: torch.Tensor) -> None:
        """Fold in one sample's class probabilities ``(N, K, H, W)``."""
        probs = probs.detach().to(torch.float64)
        if probs.dim() < 2:
            raise ValueError(f"expected probabilities (N, K, ...), got shape {tuple(probs.shape)}")
        if self._mean is None:
            self._mean = torch.zeros_like(probs)
            self._m2 = torch.zeros_like(probs)
            self._votes = torch.zeros_like(probs)
        elif probs.shape != self._mean.shape:
            raise ValueError(
                f"sample of shape {tuple(probs.shape)} differs from the first sample's "
                f"{tuple(self._mean.shape)}"
            )
        self.count += 1
        delta = probs - self._mean
        self._mean += delta / self.count
        self._m2 += delta * (probs - self._mean)
        self._votes.scatter_add_(1, probs.argmax(1, keepdim=True), torch.ones_like(probs[:, :1]))

    def _check(self) -> None:
        if self.count == 0:
            raise ValueError("no samples added")

    @property
    def mean(self) -> torch.Tensor:
        """Mean soft mask ``(N, K, H, W)`` (float32): the predictive distribution."""
        self._check()
        return self._mean.float()

    @property
    def variance(self) -> torch.Tensor:
        """Variance across samples ``(N, H, W)`` (float32), summed over classes.

        The population variance (divided by ``S``) of each class probability, summed over the
        ``K`` classes: the trace of the samples' covariance. 0 when every sample agrees; at
        most ``1 - 1/K``, reached when one-hot samples split evenly between all classes
        (0.5 for two classes). With one sample it is 0 everywhere.
        """
        self._check()
        return (self._m2 / self.count).sum(1).clamp_min(0).float()

    @property
    def vote_shares(self) -> torch.Tensor:
        """Fraction of samples whose argmax is each class, ``(N, K, H, W)`` (float32)."""
        self._check()
        return (self._votes / self.count).float()

    def scores(self, fusion: str = "mean") -> torch.Tensor:
        """Per-class scores ``(N, K, H, W)`` whose argmax is the fused label map.

        ``"mean"``: the mean soft mask. ``"vote"``: vote shares plus ``mean / (2 S)``, which
        is below half a vote, so it only breaks ties. Scores stay smooth enough to be resized
        bilinearly before the argmax, as soft masks are.
        """
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {list(FUSIONS)}")
        if fusion == "mean":
            return self.mean
        self._check()
        return ((self._votes + 0.5 * self._mean) / self.count).float()


def stats_of(samples: torch.Tensor) -> SampleStats:
    """:class:`SampleStats` of stacked samples ``(S, N, K, H, W)``."""
    if samples.dim() < 3 or samples.shape[0] < 1:
        raise ValueError(f"expected samples (S, N, K, ...), got shape {tuple(samples.shape)}")
    stats = SampleStats()
    for probs in samples:
        stats.add(probs)
    return stats


def fuse(samples: torch.Tensor, fusion: str = "mean") -> torch.Tensor:
    """Label map ``(N, H, W)`` (int64) fused from stacked samples ``(S, N, K, H, W)``."""
    return stats_of(samples).scores(fusion).argmax(1)
