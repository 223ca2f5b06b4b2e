"""Per-pixel uncertainty maps, one number per case, and how the maps are named on disk.

Two maps are written beside each predicted mask ``<case><ending>``:

* ``<case>_variance<ending>``: variance across samples, summed over classes
  (:attr:`~medflow.uncertainty.fusion.SampleStats.variance`); 0 where every sample agrees,
  and 0 everywhere with one sample or a plain UNet (no noise to vary);
* ``<case>_entropy<ending>``: predictive entropy ``-sum_k p_k ln p_k`` of the mean soft mask,
  in nats; 0 for a certain pixel, at most ``ln K``. A plain UNet's softmax has an entropy too.

NIfTI and TIFF hold the values as float32. PNG holds integers only, so a PNG map is 16-bit
with ``round(65535 * value / max)``, ``max`` being the largest value the map can take
(``1 - 1/K`` for variance, ``ln K`` for entropy); :func:`png_scale` gives it.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

MAPS = ("variance", "entropy")


def entropy_map(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy ``(N, H, W)`` in nats of class probabilities ``(N, K, H, W)``.

    ``0 ln 0`` counts as 0, so a one-hot pixel has entropy exactly 0.
    """
    if probs.dim() < 2:
        raise ValueError(f"expected probabilities (N, K, ...), got shape {tuple(probs.shape)}")
    p = probs.to(torch.float64).clamp(0, 1)
    return (-torch.special.xlogy(p, p).sum(1)).clamp_min(0).float()


def map_name(case_id: str, kind: str, ending: str) -> str:
    """File name of a case's ``kind`` map (``"variance"`` or ``"entropy"``)."""
    if kind not in MAPS:
        raise ValueError(f"unknown uncertainty map {kind!r}; expected one of {list(MAPS)}")
    return f"{case_id}_{kind}{ending}"


def sample_name(case_id: str, index: int, ending: str) -> str:
    """File name of posterior sample ``index`` of a case (a label map), written by
    ``medflow predict --save-samples``: ``<case>_sample00<ending>``, ``_sample01``, ..."""
    if not 0 <= index < 100:
        raise ValueError(f"sample index must be in 0..99, got {index}")
    return f"{case_id}_sample{index:02d}{ending}"


PROBABILITIES = "probabilities"  # <case>_probabilities<ending>: the fused soft mask (X, Y, Z, K)


def split_map_name(case_id: str) -> tuple[str, str] | None:
    """``("case", "entropy")`` for the id ``"case_entropy"``, ``("case", "sample03")`` for
    ``"case_sample03"``, ``("case", "probabilities")`` for ``"case_probabilities"``; ``None``
    for any other id."""
    for kind in (*MAPS, PROBABILITIES):
        suffix = f"_{kind}"
        if case_id.endswith(suffix) and len(case_id) > len(suffix):
            return case_id[: -len(suffix)], kind
    m = _SAMPLE.fullmatch(case_id)
    return (m.group(1), f"sample{m.group(2)}") if m and m.group(1) else None


_SAMPLE = re.compile(r"(.+)_sample([0-9]{2})")


def png_scale(kind: str, num_classes: int) -> float:
    """The value a 16-bit PNG map stores as 65535 (module docstring)."""
    if num_classes < 2:
        raise ValueError(f"need at least two classes, got {num_classes}")
    if kind == "variance":
        return 1.0 - 1.0 / num_classes
    if kind == "entropy":
        return math.log(num_classes)
    raise ValueError(f"unknown uncertainty map {kind!r}; expected one of {list(MAPS)}")


def case_uncertainty(entropy: np.ndarray, labels: np.ndarray) -> float:
    """One number per case: summed entropy per predicted foreground voxel.

    ``sum(entropy) / max(#voxels with label != 0, 1)``. Summing over the whole image counts
    doubt outside the predicted structure too (a part the prediction may have missed), and
    dividing by the structure's size makes cases of different sizes comparable, as Dice is.
    A case predicted empty is divided by 1, so any doubt there stands out.
    """
    entropy, labels = np.asarray(entropy), np.asarray(labels)
    if entropy.shape != labels.shape:
        raise ValueError(f"entropy shape {entropy.shape} differs from labels shape {labels.shape}")
    return float(entropy.sum(dtype=np.float64) / max(int(np.count_nonzero(labels)), 1))
