"""The one place where integer label maps become continuous flow states and back.

A label map with K classes (background included) becomes K channels, one-hot scaled to
[-1, 1]: the class's channel is +1, every other channel -1. Noise ``x0 ~ N(0, I)`` then has
the same scale as the data, and any point of the scaled simplex
``{2p - 1 : p a probability vector}`` decodes by argmax. Decoding never needs a threshold, so
binary and multi-class masks take the same path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_to_flow(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Encode a label map ``(B, H, W)`` of values in ``0..K-1`` as ``(B, K, H, W)`` in {-1, 1}."""
    onehot = F.one_hot(mask.long(), num_classes).movedim(-1, 1)
    return onehot.to(torch.float32) * 2.0 - 1.0


def flow_to_probs(x: torch.Tensor) -> torch.Tensor:
    """Map a flow state ``(B, K, H, W)`` back to class probabilities on the simplex.

    ``(x + 1) / 2`` recovers ``p`` exactly for points of the scaled simplex; states off it
    (a sampler's intermediate steps, a diffusion model's clipped estimate) are clipped at 0
    and renormalised. A pixel with every channel at or below -1 names no class and becomes
    uniform (argmax: class 0, as before), so every pixel's probabilities sum to 1.
    """
    p = ((x + 1.0) * 0.5).clamp_min(0.0)
    total = p.sum(dim=1, keepdim=True)
    return torch.where(total > 0, p / total.clamp_min(1e-12), 1.0 / x.shape[1])


def flow_to_mask(x: torch.Tensor) -> torch.Tensor:
    """Decode a flow state ``(B, K, H, W)`` to a label map ``(B, H, W)`` by argmax."""
    return x.argmax(dim=1)
