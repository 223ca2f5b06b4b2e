"""Per-pixel uncertainty maps and one number per case (their file names:
:mod:`medflow.data.naming`).

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

import numpy as np
import torch

from medflow.data.naming import MAPS


def entropy_map(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy ``(N, H, W)`` in nats of class probabilities ``(N, K, H, W)``.

    ``0 ln 0`` counts as 0, so a one-hot pixel has entropy exactly 0.
    """
    if probs.dim() < 2:
        raise ValueError(f"expected probabilities (N, K, ...), got shape {tuple(probs.shape)}")
    p = probs.to(torch.float64).clamp(0, 1)
    return (-torch.special.xlogy(p, p).sum(1)).clamp_min(0).float()


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
