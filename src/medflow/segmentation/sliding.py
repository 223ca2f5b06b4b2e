"""Sliding-window inference: slices of any in-plane size predicted patch by patch by a network
trained on patches, blended with a Gaussian importance map (MONAI's
``sliding_window_inference``), for every method and sampler its ``probs`` runs.

The noise of a flow or diffusion sample is one field over the whole slice, drawn as
:mod:`medflow.segmentation.inference` draws it (sample ``j`` from a generator seeded
``seed + j``, shape ``(N, K, H, W)``, for the whole set before any batching) and carried
through MONAI as extra input channels, so every window that sees a pixel starts from the same
noise there, and results depend neither on the chunk of slices nor on ``sw_batch_size``.
Ancestral DDPM draws fresh noise at every step, which cannot follow windows this way; it is
refused here (:func:`window_probs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from medflow.errors import OptionError
from medflow.segmentation.inference import SamplingOptions, _noise
from medflow.segmentation.methods import Method

# pixels per network call that a batch of options.batch_size slices stands for: the fixed
# 96 x 96 mode's, whose memory medflow has always run in
CALL_PIXELS = 96 * 96


def default_windows(batch_size: int, patch: Sequence[int]) -> int:
    """Windows per network call: as many pixels as ``batch_size`` slices of 96 x 96, at least
    one window. A 128 x 128 patch with batch 32 gives 18 windows, a CT's 512 x 512 patch 1:
    activation memory then stays what a batch of 96 x 96 slices takes, whatever the patch
    (32 windows of 512 x 512 took 7.4 GiB on a 512 x 512 x 300 volume)."""
    return max(1, round(batch_size * CALL_PIXELS / (int(patch[0]) * int(patch[1]))))


@torch.no_grad()
def window_probs(
    method: Method,
    net: nn.Module,
    slices: torch.Tensor,
    options: SamplingOptions,
    patch: Sequence[int],
    *,
    overlap: float = 0.5,
    per_sample: bool = False,
    sw_batch_size: int | None = None,
) -> torch.Tensor:
    """What ``method.probs(net, slices, options, per_sample)`` returns, computed window by
    window: ``(N, K, H, W)`` float32 on the CPU, or with ``per_sample`` ``(S, N, K, H, W)``.

    Windows of ``patch`` slide with ``overlap``; each pixel's probabilities are the windows'
    weighted by MONAI's Gaussian importance map (sigma 1/8 of the patch), renormalised to sum
    to 1 over classes (the weighted mean of probability vectors already does, to rounding).
    A slice smaller than ``patch`` is zero-padded to it, evenly on both sides (the odd pixel
    after), its noise too, and the output cropped back to ``(H, W)``.

    Slices go through MONAI ``options.batch_size`` at a time, so its buffers (the chunk's
    windows, blended output and weights) stay bounded on a 512 x 512 x 300 CT; the noise is
    drawn for the whole set first, as large as a ``per_sample`` result. ``sw_batch_size``
    (windows per network call) defaults to :func:`default_windows`: the pixels of
    ``options.batch_size`` slices of 96 x 96, so a large patch does not multiply the
    activation memory. A UNet with Monte-Carlo
    dropout draws its masks per network call (:func:`~medflow.segmentation.inference.unet_probs`):
    its samples, alone, depend on ``sw_batch_size``.

    Args:
        method: the checkpoint's method; it resolves ``options`` (``mask_options`` and
            ``sample_options`` are the caller's).
        net: its network, on any device; ``method.probs`` runs it in eval mode and restores
            its mode.
        slices: ``(N, C, H, W)`` network-ready slices at the planned spacing, any ``H, W``.
        options: sampling options, resolved or resolvable by ``method``.
        patch: ``(h, w)`` the training patch (multiples of the network's size multiple).
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
        per_sample: keep every sample's probabilities apart.
        sw_batch_size: windows per network call; None takes :func:`default_windows`.

    Raises:
        OptionError: sampler ``"ddpm"``: its fresh noise of every step is drawn per window,
            so overlapping windows would blend different ancestral paths into something that
            is no sample (and depends on ``sw_batch_size``); DDIM has no per-step noise.
        ValueError: slices not ``(N, C, H, W)``, a bad ``patch``, ``overlap`` or
            ``sw_batch_size``.
    """
    o = method.resolve(options)
    if o.sampler == "ddpm":
        raise OptionError(
            "sampler 'ddpm' draws fresh noise at every step, which sliding windows cannot "
            "share between overlapping windows; use 'ddim', or predict without windows"
        )
    if slices.ndim != 4:
        raise ValueError(f"slices must be (N, C, H, W), got {tuple(slices.shape)}")
    patch = tuple(int(p) for p in patch)
    if len(patch) != 2 or min(patch) < 1:
        raise ValueError(f"patch must be two positive sizes (h, w), got {patch}")
    sw = default_windows(o.batch_size, patch) if sw_batch_size is None else sw_batch_size
    if sw < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw}")
    c, k = slices.shape[1], net.cfg.num_classes
    # a UNet draws no noise (its Monte-Carlo dropout masks come from the network call)
    noise = _noise(slices, k, o.samples, o.seed) if method.kind != "UNet" else []
    # each MONAI batch of windows is one network call
    inner = dataclasses.replace(o, batch_size=sw)

    def predictor(win: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, C + S * K, h, w)``: image channels, then each sample's noise."""
        z = list(win[:, c:].split(k, dim=1)) if noise else None
        p = method.probs(net, win[:, :c], inner, per_sample=per_sample, noise=z)
        # (S, B, K, h, w) -> (B, S * K, h, w): MONAI blends every channel with the same weights
        return p.transpose(0, 1).flatten(1, 2) if per_sample else p

    out = []
    for start in range(0, slices.shape[0], o.batch_size):
        rows = slice(start, start + o.batch_size)
        chunk = torch.cat([slices[rows].float().cpu(), *(z[rows] for z in noise)], dim=1)
        out.append(
            sliding_window_inference(
                chunk,
                roi_size=patch,
                sw_batch_size=sw,
                predictor=predictor,
                overlap=overlap,
                mode="gaussian",
            )
        )
    probs = torch.cat(out)  # (N, S * K, H, W) with per_sample, else (N, K, H, W)
    if per_sample:
        probs = probs.unflatten(1, (-1, k)).transpose(0, 1)
    return probs / probs.sum(dim=-3, keepdim=True)
