"""Lesion-wise detection: how many lesions were found, beside how well voxels overlap (Dice).

Dice is dominated by the large lesions; a missed 3 mm lesion barely moves it. Lesion-wise
scores count objects instead (as the MSSEG challenge and BraTS 2023 do):

* **Objects** are the connected components of the reference and of the prediction, for the
  class ``label``, with full connectivity by default (``connectivity=None``: 26 neighbours
  in 3D, 8 in 2D, as BraTS' lesion-wise metrics); ``connectivity=1`` uses face neighbours
  only (6 in 3D, 4 in 2D).
* **Matching rule**: a reference lesion and a predicted component *match* when they overlap
  with an intersection over union of at least ``min_iou`` (default 0: any shared voxel).
  A reference lesion matched by some component is *detected* (``tp``), otherwise missed
  (``fn``); a predicted component that matches no reference lesion is a false positive
  (``fp``); one that matches one is counted in ``tp_predicted``. A component that covers two
  lesions detects both; two components on one lesion both count as correct.
* ``recall = tp / n_reference``, ``precision = tp_predicted / n_predicted``,
  ``F1 = 2 P R / (P + R)``.

Empty policy (never NaN, so no mean drops a case silently):

* no reference lesion and no predicted component: precision = recall = F1 = 1 (nothing to
  find and nothing falsely found, as :mod:`medflow.metrics.overlap` scores Dice);
* no reference lesion, some predicted: recall = 1 (nothing was missed), precision = 0,
  F1 = 0;
* some reference lesions, nothing predicted: precision = 1 (nothing was falsely found),
  recall = 0, F1 = 0;
* F1 is 0 whenever precision or recall is 0.

Over a data set, :func:`pool` sums the counts of the cases and scores the sums (micro
average): every lesion weighs the same, whichever case holds it.

With ``size_bins_mm``, reference lesions are also binned by their equivalent diameter in mm
(the sphere's, or for a 2D image the disc's, of the same size, using ``spacing``) and the
recall of each bin is reported; a bin without lesions has recall ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class SizeBin:
    """Recall of reference lesions whose equivalent diameter lies in ``[lo_mm, hi_mm)``.

    Attributes:
        lo_mm: lower edge.
        hi_mm: upper edge (``inf`` for the last bin).
        lesions: reference lesions in the bin.
        detected: of those, the detected ones.
    """

    lo_mm: float
    hi_mm: float
    lesions: int
    detected: int

    @property
    def recall(self) -> float | None:
        """``detected / lesions``; ``None`` for an empty bin."""
        return self.detected / self.lesions if self.lesions else None


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise counts and scores of one case, or of several pooled (:func:`pool`).

    Attributes:
        tp: reference lesions detected.
        fn: reference lesions missed.
        fp: predicted components that match no reference lesion.
        tp_predicted: predicted components that match a reference lesion.
        size_bins: recall per lesion size, empty unless bins were asked for.
    """

    tp: int
    fn: int
    fp: int
    tp_predicted: int
    size_bins: tuple[SizeBin, ...] = ()

    @property
    def n_reference(self) -> int:
        """Reference lesions."""
        return self.tp + self.fn

    @property
    def n_predicted(self) -> int:
        """Predicted components."""
        return self.tp_predicted + self.fp

    @property
    def recall(self) -> float:
        """Detected reference lesions over reference lesions (1 without any)."""
        return self.tp / self.n_reference if self.n_reference else 1.0

    @property
    def precision(self) -> float:
        """Correct predicted components over predicted components (1 without any)."""
        return self.tp_predicted / self.n_predicted if self.n_predicted else 1.0

    @property
    def f1(self) -> float:
        """``2 P R / (P + R)``; 1 when both are empty, 0 when P or R is 0."""
        if self.n_reference == 0 and self.n_predicted == 0:
            return 1.0
        p, r = self.precision, self.recall
        return 0.0 if p + r == 0 else 2 * p * r / (p + r)

    def to_dict(self) -> dict:
        """Counts, scores and bins as a JSON-ready dict."""
        return {
            "tp": self.tp,
            "fn": self.fn,
            "fp": self.fp,
            "tp_predicted": self.tp_predicted,
            "n_reference": self.n_reference,
            "n_predicted": self.n_predicted,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "size_bins": [
                {
                    "lo_mm": b.lo_mm,
                    "hi_mm": b.hi_mm if math.isfinite(b.hi_mm) else None,
                    "lesions": b.lesions,
                    "detected": b.detected,
                    "recall": b.recall,
                }
                for b in self.size_bins
            ],
        }


def components(mask: np.ndarray, connectivity: int | None = None) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask: ``(labels, n)``, labels ``1..n``.

    Args:
        mask: boolean array, 2D or 3D (a singleton axis is fine).
        connectivity: 1 (face neighbours) up to ``mask.ndim``; ``None`` (default) is full
            connectivity, ``mask.ndim``; see ``scipy.ndimage.generate_binary_structure``.

    Raises:
        ValueError: ``connectivity`` outside ``1..mask.ndim``.
    """
    mask = np.asarray(mask, dtype=bool)
    connectivity = mask.ndim if connectivity is None else connectivity
    if not 1 <= connectivity <= max(mask.ndim, 1):
        raise ValueError(f"connectivity must be 1..{mask.ndim}, got {connectivity}")
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    labels, n = ndimage.label(mask, structure=structure)
    return labels, int(n)


def equivalent_diameters(
    sizes_voxels: np.ndarray, spacing: Sequence[float], shape: Sequence[int]
) -> np.ndarray:
    """Equivalent diameters in mm of objects of ``sizes_voxels`` voxels on a grid of
    ``shape`` and ``spacing``: spheres in 3D, discs where the grid has a singleton axis."""
    axes = [a for a in range(len(shape)) if shape[a] > 1]
    flat = len(axes) < len(shape) or len(shape) == 2
    voxel = float(np.prod([spacing[a] for a in axes])) if axes else 1.0
    size = np.asarray(sizes_voxels, dtype=np.float64) * voxel
    if flat:
        return 2.0 * np.sqrt(size / math.pi)
    return np.cbrt(6.0 * size / math.pi)


def lesion_detection(
    pred: np.ndarray,
    ref: np.ndarray,
    label: int | None = 1,
    *,
    min_iou: float = 0.0,
    connectivity: int | None = None,
    spacing: Sequence[float] | None = None,
    size_bins_mm: Sequence[float] | None = None,
) -> LesionDetection:
    """Lesion-wise detection of one case (see the module docstring for the rules).

    Args:
        pred: predicted integer label map, ``(X, Y, Z)`` or ``(H, W)``.
        ref: reference integer label map of the same shape.
        label: the lesion class; ``None`` takes every nonzero value as lesion.
        min_iou: a reference lesion and a predicted component match when their IoU is at
            least this (0: any overlap).
        connectivity: 1 (face neighbours) up to the number of axes; ``None`` (default):
            full connectivity.
        spacing: voxel size in mm per axis (default 1 mm), for the size bins.
        size_bins_mm: increasing bin edges in mm, e.g. ``(0, 5, 10, 20)``; the last bin
            runs to infinity. ``None``: no bins.

    Returns:
        Counts, scores and (optionally) recall per size bin.

    Raises:
        ValueError: shapes differ, ``min_iou`` is outside [0, 1], the bin edges do not
            increase, or ``spacing`` has the wrong length.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if not 0.0 <= min_iou <= 1.0:
        raise ValueError(f"min_iou must be in [0, 1], got {min_iou}")
    spacing = (1.0,) * ref.ndim if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for {ref.ndim} axes")
    ref_lab, n_ref = components(ref != 0 if label is None else ref == label, connectivity)
    pred_lab, n_pred = components(pred != 0 if label is None else pred == label, connectivity)

    ref_matched = np.zeros(n_ref + 1, dtype=bool)
    pred_matched = np.zeros(n_pred + 1, dtype=bool)
    both = (ref_lab > 0) & (pred_lab > 0)
    if both.any():
        # every overlapping (reference, predicted) pair with its intersection in voxels
        pairs, inter = np.unique(
            ref_lab[both].astype(np.int64) * (n_pred + 1) + pred_lab[both], return_counts=True
        )
        r, p = pairs // (n_pred + 1), pairs % (n_pred + 1)
        size_ref = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)
        size_pred = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
        iou = inter / (size_ref[r] + size_pred[p] - inter)
        ok = iou >= min_iou
        ref_matched[r[ok]] = True
        pred_matched[p[ok]] = True
    tp = int(ref_matched[1:].sum())
    tp_pred = int(pred_matched[1:].sum())
    bins: tuple[SizeBin, ...] = ()
    if size_bins_mm is not None:
        edges = [float(e) for e in size_bins_mm]
        if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"size_bins_mm must be increasing edges, got {list(size_bins_mm)}")
        sizes = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)[1:]
        diam = equivalent_diameters(sizes, spacing, ref.shape)
        hits = ref_matched[1:]
        uppers = edges[1:] + [math.inf]
        bins = tuple(
            SizeBin(
                lo,
                hi,
                int(((diam >= lo) & (diam < hi)).sum()),
                int(((diam >= lo) & (diam < hi) & hits).sum()),
            )
            for lo, hi in zip(edges, uppers)
        )
    return LesionDetection(
        tp=tp, fn=n_ref - tp, fp=n_pred - tp_pred, tp_predicted=tp_pred, size_bins=bins
    )


def pool(results: Sequence[LesionDetection]) -> LesionDetection:
    """The counts of several cases summed, scored once (micro average); size bins are
    summed bin by bin and must have the same edges in every case.

    Raises:
        ValueError: no results, or cases with different size bins.
    """
    if not results:
        raise ValueError("no lesion detection results to pool")
    edges = [tuple((b.lo_mm, b.hi_mm) for b in r.size_bins) for r in results]
    if len(set(edges)) > 1:
        raise ValueError("cases have different size bins; pool results with the same bins")
    bins = tuple(
        SizeBin(
            lo,
            hi,
            sum(r.size_bins[i].lesions for r in results),
            sum(r.size_bins[i].detected for r in results),
        )
        for i, (lo, hi) in enumerate(edges[0])
    )
    return LesionDetection(
        tp=sum(r.tp for r in results),
        fn=sum(r.fn for r in results),
        fp=sum(r.fp for r in results),
        tp_predicted=sum(r.tp_predicted for r in results),
        size_bins=bins,
    )
