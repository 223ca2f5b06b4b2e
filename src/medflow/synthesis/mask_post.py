"""Clean-up of sampled label maps: small islands removed, small holes filled.

A generative mask flow leaves debris a real segmentation does not have: isolated specks of a
class a few pixels large and pinholes inside a region. :func:`clean_masks` removes, for every
foreground class, the connected components smaller than ``min_size`` pixels and fills the
holes (regions of other labels that a class encloses, not connected to the slice's border)
smaller than ``max_hole`` pixels, pass after pass until neither is left. A removed island's
pixels take the label that holds most of the pixels bordering it (ties: the lower label),
so a speck of white matter inside grey matter becomes grey matter and one in the background
becomes background. Large structures, and large enclosed regions such as ventricles, are
left as they are.

Foreground components are 8-connected and holes 4-connected (the usual pairing on a pixel
grid: a diagonal chain of pixels is a line that separates two regions). Sizes are in pixels
at the training size. Built on ``scipy.ndimage``: MONAI's ``RemoveSmallObjects`` needs
scikit-image, which is not a dependency, and its ``FillHoles`` fills holes of any size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage

# 8-connectivity for a class's components; holes use scipy's default 4-connected structure
EIGHT = np.ones((3, 3), dtype=bool)
MAX_PASSES = 8


@dataclass(frozen=True)
class MaskCleanup:
    """Sizes of the clean-up, in pixels at the training size.

    Attributes:
        min_size: a foreground component with fewer pixels is removed.
        max_hole: a hole of a foreground class with fewer pixels is filled with the class.
    """

    min_size: int = 8
    max_hole: int = 8

    def __post_init__(self) -> None:
        if self.min_size < 0 or self.max_hole < 0:
            raise ValueError(f"clean-up sizes must be >= 0, got {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MaskCleanup:
        return cls(min_size=int(d["min_size"]), max_hole=int(d["max_hole"]))


def clean_masks(masks: torch.Tensor, num_classes: int, cleanup: MaskCleanup) -> torch.Tensor:
    """Clean a batch of label maps.

    Args:
        masks: ``(B, H, W)`` integer label maps with values ``0 .. num_classes - 1``.
        num_classes: K, background included.
        cleanup: the sizes.

    Returns:
        ``(B, H, W)`` label maps of ``masks``' dtype, on the CPU.
    """
    out = [clean_mask(m, num_classes, cleanup) for m in masks.cpu().numpy()]
    return torch.from_numpy(np.stack(out)).to(masks.dtype) if out else masks.cpu().clone()


def clean_mask(mask: np.ndarray, num_classes: int, cleanup: MaskCleanup) -> np.ndarray:
    """One ``(H, W)`` label map. A pass removes islands (class by class, each seeing the
    labels the previous one left), then fills holes; filling a hole can cut another class's
    component down to a new small island, so passes repeat until nothing changes (at most
    :data:`MAX_PASSES`; two or three suffice even on random speckle)."""
    lab = mask.copy()
    for _ in range(MAX_PASSES):
        before = lab.copy()
        for c in range(1, num_classes):
            _remove_islands(lab, c, cleanup.min_size)
        for c in range(1, num_classes):
            _fill_holes(lab, c, cleanup.max_hole)
        if np.array_equal(lab, before):
            break
    return lab


def _remove_islands(lab: np.ndarray, c: int, min_size: int) -> None:
    """Relabel, in place, every 8-connected component of class ``c`` smaller than
    ``min_size`` by the majority label of the pixels around it."""
    comps, n = ndimage.label(lab == c, structure=EIGHT)
    if n == 0:
        return
    sizes = np.bincount(comps.ravel())
    for i, box in enumerate(ndimage.find_objects(comps), start=1):
        if sizes[i] >= min_size:
            continue
        # the component's box grown by one pixel holds its whole 8-neighbourhood
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        comp = comps[grown] == i
        ring = ndimage.binary_dilation(comp, structure=EIGHT) & ~comp
        around = lab[grown][ring]
        if around.size == 0:  # the class fills the slice: nothing to give the pixels to
            continue
        # a maximal component borders no pixel of its own class, so the vote is among others
        lab[grown][comp] = np.bincount(around).argmax()


def _fill_holes(lab: np.ndarray, c: int, max_hole: int) -> None:
    """Set, in place, every hole of class ``c`` smaller than ``max_hole`` pixels to ``c``."""
    region = lab == c
    holes = ndimage.binary_fill_holes(region) & ~region
    comps, n = ndimage.label(holes)
    if n == 0:
        return
    sizes = np.bincount(comps.ravel())
    small = np.flatnonzero(sizes < max_hole)
    small = small[small > 0]
    lab[np.isin(comps, small)] = c
