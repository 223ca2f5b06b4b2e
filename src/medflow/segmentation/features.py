"""The early feature maps of a trained segmenter, on the image alone: what the AlignFlow
reward's ``"segmenter"`` group reads (:class:`medflow.synthesis.reward.FeatureEncoder`, which
takes the module as its ``extractor`` and so never imports this package).

Why a segmenter's early layers: a segmenter trained on the source fails on the target site,
so its features are not invariant to the shift, and its first levels respond to the
intensity, contrast and texture the shift changes, before the anatomy dominates.

Which layers: a plain UNet reads the image alone, so its early features are its trunk's
first levels (the encoder blocks' outputs, the skips). A flow segmenter's trunk reads the
image concatenated with the flow state ``x_t`` from its stem on, and every block is
modulated by the time: its features would need a choice of both. Its image branch sees
neither, so its levels are the features taken; a flow network without the branch has no
image-only features and is refused. A diffusion model has the flow network's structure and
is treated the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medflow.errors import DataError
from medflow.models.unet import SegNet
from medflow.segmentation.predict import Predictor


class EarlyFeatures(nn.Module):
    """Frozen ``image -> [first levels' feature maps]`` of a :class:`SegNet`.

    A plain UNet (``not cfg.flow``): ``h = stem(image)``, then for level ``i < levels``
    ``h = enc[i](h)`` (collected) and ``down[i]`` before the next level, exactly as its
    forward pass runs the trunk. A flow network with an image branch: the branch's first
    ``levels`` maps, ``net.image_features(image)[:levels]``, computed without the coarser
    ones. Level ``i`` works at ``1 / 2**i`` of the input size with ``cfg.channels[i]``
    channels.

    The module has no trainable parameters and stays in eval mode whatever a parent does
    (dropout off, the reward a fixed yardstick), and is differentiable w.r.t. the image.

    Args:
        net: the network; frozen and put in eval mode in place.
        levels: how many levels, ``1 .. len(net.cfg.channels)``.

    Shapes: ``(B, C, H, W)`` -> ``[(B, channels[i], H / 2**i, W / 2**i) for i < levels]``
    (sizes rounded up at each stride-2 step).

    Raises:
        ValueError: a bad ``levels``, or a flow network without an image branch.
    """

    def __init__(self, net: SegNet, levels: int = 2) -> None:
        super().__init__()
        depth = len(net.cfg.channels)
        if not 1 <= levels <= depth:
            raise ValueError(f"levels must be in 1..{depth} (the network's levels), got {levels}")
        if net.cfg.flow and not net.cfg.image_branch:
            raise ValueError("a flow network without an image branch has no image-only features")
        self.net, self.levels = net, levels
        self.channels = tuple(net.cfg.channels[:levels])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EarlyFeatures:
        # a parent's .train() must not turn dropout on: the features are a fixed yardstick
        return super().train(False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        if image.ndim != 4 or image.shape[1] != net.cfg.in_channels:
            raise ValueError(
                f"image must be (B, {net.cfg.in_channels}, H, W), got {tuple(image.shape)}"
            )
        if net.cfg.flow:
            # image_features(image)[:levels], without the coarser levels' cost
            feats = [net.cond_stem(image)]
            for down in net.cond_down[: self.levels - 1]:
                feats.append(down(feats[-1]))
            return feats
        h, feats = net.stem(image), []
        for i in range(self.levels):
            if i > 0:
                h = net.down[i - 1](h)
            # a plain UNet's blocks take no time embedding
            h = net.enc[i](h, None)
            feats.append(h)
        return feats


def early_features(checkpoint: str | Path, levels: int = 2, device: str = "cpu") -> EarlyFeatures:
    """The first ``levels`` feature maps of a ``medflow train`` checkpoint's network, frozen:
    the ``extractor`` of the reward's ``"segmenter"`` group (:class:`EarlyFeatures`).

    The network expects images z-scored as its training data were (the reward's are z-scored
    64 x 64 slices, :mod:`medflow.synthesis.view`) at its training size. The group takes
    per-channel means and stds over the pixels, so another size changes only how much
    anatomy a filter spans; any ``H, W`` that is a multiple of the network's
    ``cfg.size_multiple`` downsamples exactly as in training.

    Args:
        checkpoint: a checkpoint of a plain UNet or of a flow network with an image branch.
        levels: how many levels, from 1 to the network's number of levels.
        device: where the network runs (``"cpu"``, ``"cuda"``, ``"auto"``).

    Raises:
        DataError: an unusable checkpoint, or a flow network without an image branch.
        ValueError: a bad ``levels``.
    """
    predictor = Predictor(checkpoint, device, channels_last=False)
    net = predictor.net
    if net.cfg.flow and not net.cfg.image_branch:
        raise DataError(
            predictor.path,
            "a flow network without an image branch reads the image only together with the "
            "flow state and time, so it has no image-only early features; use a UNet or a "
            "flow network trained with the image branch",
        )
    return EarlyFeatures(net, levels)
