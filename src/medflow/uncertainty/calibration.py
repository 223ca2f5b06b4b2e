"""Does the uncertainty mean something? Calibration and error ranking, pooled over pixels.

* :func:`expected_calibration_error`: top-label ECE (Guo et al. 2017). Pixels are binned by
  confidence (the fused probability of the predicted class) into ``n_bins`` equal-width bins
  ``[i/B, (i+1)/B)``, the last one closed at 1; ECE is the pixel-weighted mean gap between
  each bin's accuracy and its mean confidence. 0 is perfect calibration.
* :func:`error_auroc`: the probability that a randomly chosen wrongly labelled pixel is more
  uncertain than a randomly chosen correct one (ties count one half), computed from ranks
  (the Mann-Whitney U statistic). 0.5 is chance, 1 a perfect ranking. It is undefined when
  there are no errors or no correct pixels: the function returns NaN then, and the caller
  says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


@dataclass(frozen=True)
class Reliability:
    """Per-bin statistics of a reliability diagram.

    Attributes:
        edges: ``(B + 1,)`` bin edges from 0 to 1.
        count: ``(B,)`` pixels per bin.
        confidence: ``(B,)`` mean confidence per bin (NaN for an empty bin).
        accuracy: ``(B,)`` fraction of correct pixels per bin (NaN for an empty bin).
    """

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def ece(self) -> float:
        """Pixel-weighted mean ``|accuracy - confidence|`` over non-empty bins."""
        used = self.count > 0
        weights = self.count[used] / self.count.sum()
        return float(np.sum(weights * np.abs(self.accuracy[used] - self.confidence[used])))


def _flat_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> tuple[np.ndarray, ...]:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} has {a.size} values but {names[1]} has {b.size}")
    if a.size == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty")
    return a, b


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> Reliability:
    """Bin pixels by ``confidence`` (in [0, 1]); ``correct`` is boolean, same size."""
    conf, ok = _flat_pair(confidence, correct, ("confidence", "correct"))
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = conf.astype(np.float64)
    if not np.isfinite(conf).all() or conf.min() < 0 or conf.max() > 1:
        raise ValueError(
            f"confidence must lie in [0, 1], got values in [{conf.min()}, {conf.max()}]"
        )
    ok = ok.astype(bool)
    index = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=conf, minlength=n_bins)
    ok_sum = np.bincount(index, weights=ok.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        accuracy = np.where(count > 0, ok_sum / count, np.nan)
    return Reliability(np.linspace(0.0, 1.0, n_bins + 1), count, mean_conf, accuracy)


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15
) -> float:
    """Top-label ECE of pixels with predicted-class probability ``confidence`` (module doc)."""
    return reliability(confidence, correct, n_bins).ece


def error_auroc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """AUROC of ``uncertainty`` as a detector of ``error`` pixels; NaN without both kinds."""
    score, err = _flat_pair(uncertainty, error, ("uncertainty", "error"))
    err = err.astype(bool)
    n_pos = int(err.sum())
    n_neg = err.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score.astype(np.float64))  # ties share their mean rank: count one half
    u = ranks[err].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either
    variable is constant or there are fewer than 3 values."""
    a, b = _flat_pair(x, y, ("x", "y"))
    if a.size < 3:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")
