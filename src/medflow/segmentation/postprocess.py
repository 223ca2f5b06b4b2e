"""nnU-Net's post-processing: keep only the largest connected component of a class, where
validation says it helps.

A 2D segmenter predicts each slice alone, so a class can appear as stray islands in slices
far from the structure (HD95 of tens of millimetres on a parcellation). Keeping the largest
3D component per class removes them, but it also removes true second components (two
lungs, several lesions), so it is decided per class on the run's validation cases: at the
end of training the final EMA network's validation predictions are scored with and without
it, and a class keeps it only if its mean Dice over the validation cases rises. The decision
is stored in the final checkpoint (``"postprocessing"``) and in ``postprocessing.json``, and
``medflow predict`` applies it to the label map (``--no-postprocess`` skips it; the
uncertainty maps stay those of the network's own prediction).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from medflow.metrics.overlap import confusion, dice


def keep_largest(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``labels`` with every component of each class in ``classes`` but its largest set to
    background (full connectivity: 26 neighbours in 3D, 8 in 2D). A copy when there is
    something to remove; ``labels`` itself when ``classes`` is empty."""
    if not classes:
        return labels
    out = np.array(labels, copy=True)
    structure = np.ones((3,) * out.ndim, dtype=bool)
    for c in classes:
        comp, n = ndimage.label(out == c, structure=structure)
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            out[(comp > 0) & (comp != 1 + int(np.argmax(sizes)))] = 0
    return out


def choose_largest(
    preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], num_classes: int
) -> dict[str, dict[str, float] | list[int]]:
    """Classes whose mean Dice over the cases ``(pred, ref)`` rises when only their largest
    component is kept, with the Dice before and after for every foreground class."""
    chosen, scores = [], {}
    for c in range(1, num_classes):
        before = [dice(*confusion(p, r, c)) for p, r in zip(preds, refs, strict=True)]
        after = [dice(*confusion(keep_largest(p, [c]), r, c)) for p, r in zip(preds, refs)]
        scores[str(c)] = {"before": float(np.mean(before)), "after": float(np.mean(after))}
        if np.mean(after) > np.mean(before):
            chosen.append(c)
    return {"largest_component": chosen, "validation_dice": scores}


def case_volumes(labels: np.ndarray, case_ids: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """Validation slices ``(N, H, W)`` grouped back into one ``(N_case, H, W)`` stack per
    case, in order (a case's slices are consecutive)."""
    out: list[tuple[str, list[np.ndarray]]] = []
    for case, slab in zip(case_ids, labels, strict=True):
        if not out or out[-1][0] != case:
            out.append((case, []))
        out[-1][1].append(slab)
    return [(case, np.stack(slabs)) for case, slabs in out]
