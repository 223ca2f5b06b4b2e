"""Overlap metrics in nnU-Net's style: count tp/fp/fn once, derive Dice and IoU from the counts.

Works on integer label maps of any dimension (2D ``(H, W)``, 3D ``(X, Y, Z)``, ...).

Empty-mask policy (the same in :mod:`medflow.metrics.surface` and ``docs/METRICS.md``):

* reference empty and prediction empty: Dice = IoU = 1 (the absence was predicted correctly,
  and the case counts in the mean, as BraTS scores it);
* exactly one of them empty (a missed or a false structure): Dice = IoU = 0, which the plain
  formula already gives because ``tp = 0`` and ``fp + fn > 0``;
* both non-empty: the usual values.

Only the first case needs a rule: ``2 tp / (2 tp + fp + fn)`` is 0/0 there, and a NaN would be
dropped silently by a later ``nanmean``.
"""

from __future__ import annotations

import numpy as np


def confusion(pred: np.ndarray, ref: np.ndarray, label: int) -> tuple[int, int, int]:
    """Count true positives, false positives and false negatives of one class.

    Args:
        pred: predicted integer label map, any shape.
        ref: reference integer label map, same shape as ``pred``.
        label: the class value to score.

    Returns:
        ``(tp, fp, fn)`` as Python ints.

    Raises:
        ValueError: ``pred`` and ``ref`` differ in shape.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    p = pred == label
    r = ref == label
    tp = int(np.count_nonzero(p & r))
    # fp and fn from the totals: two reductions instead of two more full boolean maps
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(r)) - tp


def _check_counts(tp: int, fp: int, fn: int) -> None:
    if min(tp, fp, fn) < 0:
        raise ValueError(f"counts must be non-negative, got tp={tp}, fp={fp}, fn={fn}")


def dice(tp: int, fp: int, fn: int) -> float:
    """Dice coefficient ``2 tp / (2 tp + fp + fn)``; 1.0 when both masks are empty.

    Raises:
        ValueError: a count is negative.
    """
    _check_counts(tp, fp, fn)
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def iou(tp: int, fp: int, fn: int) -> float:
    """Intersection over union (Jaccard) ``tp / (tp + fp + fn)``; 1.0 when both masks are empty.

    Raises:
        ValueError: a count is negative.
    """
    _check_counts(tp, fp, fn)
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def dice_per_class(pred, ref, num_classes: int) -> list[float]:
    """Dice of each foreground class ``1 .. num_classes - 1``, pooled over every element of
    two label maps of any shape (numpy arrays or CPU tensors; a batch of slices is scored as
    one volume). Empty policy as :func:`dice`."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    return [dice(*confusion(pred, ref, c)) for c in range(1, num_classes)]


def dice_rows(pred, ref) -> np.ndarray:
    """Dice of every row of two boolean masks ``(N, ...)``, each row scored on its own:
    ``(N,)`` float64, 1.0 for a row where both masks are empty (as :func:`dice`)."""
    p = np.asarray(pred, dtype=bool).reshape(len(pred), -1)
    r = np.asarray(ref, dtype=bool).reshape(len(ref), -1)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    tp = np.count_nonzero(p & r, axis=1)
    denom = np.count_nonzero(p, axis=1) + np.count_nonzero(r, axis=1)
    return np.where(denom == 0, 1.0, 2.0 * tp / np.maximum(denom, 1))
