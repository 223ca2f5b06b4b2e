"""The one place where integer label maps become continuous flow states and back.

A label map with K classes (background included) becomes K channels, one-hot scaled to
[-1, 1]: the class's channel is +1, every other channel -1. Noise ``x0 ~ N(0, I)`` then has
the same scale as the data, and any point of the scaled simplex
``{2p - 1 : p a probability vector}`` decodes by argmax. Decoding never needs a threshold, so
binary and multi-class masks take the same path.

The mask flow may instead use a smoother encoding, per-class signed distances squashed by
``tanh`` (:func:`mask_to_sdf`, :func:`sdf_to_mask`); the pair lives here beside the one-hot
pair so that the two encodings are defined in one place.
"""

from __future__ import annotations

import numpy as np
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


def mask_to_sdf(mask: torch.Tensor, num_classes: int, width: float) -> torch.Tensor:
    """Encode a label map ``(B, H, W)`` as per-class signed distances ``(B, K, H, W)``.

    Channel ``k`` is ``tanh(d_k / width)`` where ``d_k`` is the signed Euclidean distance in
    pixels of the (resized) slice to class ``k``'s boundary, positive inside the class. The
    boundary lies half-way between pixels, so ``|d_k| >= 0.5`` everywhere: a pixel's own
    class is the only positive channel and :func:`sdf_to_mask` (argmax) recovers the label
    map exactly. A class absent from a slice is -1 everywhere, one that fills it +1. Unlike
    the one-hot encoding, the state varies smoothly across a boundary over about ``width``
    pixels, so a small displacement of an edge is a small change of the state.
    """
    from scipy.ndimage import distance_transform_edt

    if width <= 0:
        raise ValueError(f"SDF width must be positive, got {width}")
    labels = mask.detach().cpu().numpy()
    out = np.empty((labels.shape[0], num_classes, *labels.shape[1:]), dtype=np.float32)
    for b, lab in enumerate(labels):
        for k in range(num_classes):
            inside = lab == k
            if not inside.any() or inside.all():
                out[b, k] = 1.0 if inside.any() else -1.0
                continue
            # edt(x): distance of every nonzero pixel to the nearest zero pixel
            d = np.where(
                inside, distance_transform_edt(inside) - 0.5, 0.5 - distance_transform_edt(~inside)
            )
            out[b, k] = np.tanh(d / width)
    return torch.from_numpy(out).to(mask.device)


def sdf_to_mask(x: torch.Tensor) -> torch.Tensor:
    """Decode a signed-distance state ``(B, K, H, W)`` to a label map ``(B, H, W)`` by argmax
    (the class whose boundary the pixel lies deepest inside)."""
    return x.argmax(dim=1)
