"""Shape statistics of label maps: do generated masks look like anatomy or like blobs?

Class areas alone do not tell a brain slice from a blob of the right size. Per foreground
class, over a set of ``(N, H, W)`` label maps, :func:`shape_statistics` measures

* ``area_mean`` / ``area_std``: the class's fraction of the slice (std with ``ddof=1``, as
  :func:`medflow.synthesis.harness.mask_statistics` has it), over every map;
* ``components_mean``: 8-connected components per map, over the maps that hold the class;
* ``boundary_per_area``: boundary length (pixel edges between the class and anything else,
  the slice's border included) per pixel of the class, pooled over the set. A digital disk
  of radius r scores about 8 r / (pi r^2) = 8 / (pi r); folded cortex, a thin ribbon,
  scores high; a blob scores low;
* ``small_fraction``: the fraction of the class's pixels (pooled) that lie in components of
  fewer than ``small`` pixels: speckle;
* ``present``: the fraction of maps that hold the class.

Pooled ratios are used because a per-map ratio is dominated by maps with a few pixels of a
class. Lengths and areas are in pixels at the size of the maps, so compare sets of one size.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from medflow.synthesis.mask_post import EIGHT

STATS = (
    "area_mean",
    "area_std",
    "components_mean",
    "boundary_per_area",
    "small_fraction",
    "present",
)


def boundary_length(region: np.ndarray) -> int:
    """Number of 4-neighbour pixel edges between ``region`` ``(H, W)`` bool and its
    complement, counting the slice's border as outside."""
    r = np.pad(region, 1, constant_values=False)
    return int((r[1:] != r[:-1]).sum() + (r[:, 1:] != r[:, :-1]).sum())


def _class_stats(regions: np.ndarray, small: int) -> dict[str, float]:
    """Statistics of one class over ``(N, H, W)`` bool maps."""
    areas = regions.reshape(len(regions), -1).sum(1)
    counts, boundary, in_small = [], 0, 0
    for region in regions:
        if not region.any():
            continue
        comps, n = ndimage.label(region, structure=EIGHT)
        sizes = np.bincount(comps.ravel())[1:]
        counts.append(n)
        boundary += boundary_length(region)
        in_small += int(sizes[sizes < small].sum())
    total = int(areas.sum())
    frac = areas / regions[0].size
    return {
        "area_mean": float(frac.mean()),
        "area_std": float(frac.std(ddof=1)) if len(frac) > 1 else 0.0,
        "components_mean": float(np.mean(counts)) if counts else 0.0,
        "boundary_per_area": boundary / total if total else 0.0,
        "small_fraction": in_small / total if total else 0.0,
        "present": len(counts) / len(regions),
    }


def shape_statistics(masks: torch.Tensor, num_classes: int, small: int = 8) -> dict:
    """Per foreground class (keys ``"1" .. str(K - 1)``) the statistics of :data:`STATS`.

    Args:
        masks: ``(N, H, W)`` integer label maps, N >= 1.
        num_classes: K, background included.
        small: components with fewer pixels count towards ``small_fraction``.
    """
    if masks.ndim != 3 or masks.shape[0] < 1:
        raise ValueError(f"masks must be (N, H, W) with N >= 1, got {tuple(masks.shape)}")
    lab = masks.cpu().numpy()
    return {str(c): _class_stats(lab == c, small) for c in range(1, num_classes)}


def relative_to(stats: dict, reference: dict) -> dict:
    """``stats`` divided by ``reference`` statistic by statistic (1 = like the reference;
    NaN where the reference is 0), per class."""
    return {
        c: {k: (v / reference[c][k] if reference[c][k] else float("nan")) for k, v in s.items()}
        for c, s in stats.items()
    }
