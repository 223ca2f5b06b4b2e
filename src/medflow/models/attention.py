"""The two MedFlowSeg modules: Dual-Branch Spatial Attention and Frequency-Aware Attention.

The papers give the ideas, not the equations; the formulation implemented here, with the
reasons for each choice, is written out in ``docs/MODEL.md``. Both modules take the flow
(trunk) features ``h`` and the image features ``g`` at the same scale, ``(B, C, H, W)`` each,
and return updated flow features of the same shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medflow.models.embeddings import groups_for


class DualBranchSpatialAttention(nn.Module):
    """DBSA: image features enter the flow through two spatial gates at two scales.

    * local branch: a 7x7 convolution over channel statistics (mean and max) of both streams
      gives one gate per pixel, ``a_loc = sigmoid(conv7([avg h, max h, avg g, max g]))``;
    * global branch: both streams average-pooled by ``pool``, a 3x3 convolution and a sigmoid
      at the pooled resolution, then bilinear upsampling, giving one gate per channel and
      pixel, ``a_glob`` (region-level context);
    * ``h' = h + a_loc * P_loc(g) + a_glob * P_glob(g)`` with 1x1 projections ``P``.

    Written for CPU speed without changing the function: the 4-to-1 7x7 convolution is a
    depthwise 7x7 convolution summed over its four channels (oneDNN runs a single-output
    convolution slowly), pooling comes before concatenation, and the two projections are one
    convolution. Only the sigmoid moved, before the upsampling, where it costs 1/pool^2.

    Args:
        channels: C of both streams.
        pool: downsampling factor of the global branch (capped by the feature size).
    """

    def __init__(self, channels: int, pool: int = 4) -> None:
        super().__init__()
        self.pool = pool
        self.local_gate = nn.Conv2d(4, 4, 7, padding=3, groups=4)
        self.global_gate = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.proj = nn.Conv2d(channels, 2 * channels, 1)

    def forward(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        stats = torch.cat(
            [
                h.mean(1, keepdim=True),
                h.amax(1, keepdim=True),
                g.mean(1, keepdim=True),
                g.amax(1, keepdim=True),
            ],
            dim=1,
        )
        a_loc = torch.sigmoid(self.local_gate(stats).sum(1, keepdim=True))
        pool = max(1, min(self.pool, h.shape[-2], h.shape[-1]))
        ctx = torch.cat(
            [F.avg_pool2d(h, pool, ceil_mode=True), F.avg_pool2d(g, pool, ceil_mode=True)], dim=1
        )
        a_glob = F.interpolate(
            torch.sigmoid(self.global_gate(ctx)),
            size=h.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        v_loc, v_glob = self.proj(g).chunk(2, dim=1)
        return torch.addcmul(torch.addcmul(h, a_loc, v_loc), a_glob, v_glob)


class FrequencyAwareAttention(nn.Module):
    """FAA: spatial and spectral mixing of flow and image features, fused by discrepancy.

    * spectral branch: ``Hf = rfft2(h)``, ``Gf = rfft2(g)``; a per-channel, per-frequency
      attention ``A = sigmoid(W_a [log|Hf|, log|Gf|, log|Hf - Gf|])`` decides, frequency by
      frequency, how much of the flow spectrum to keep and how much of the image spectrum to
      take, ``s_freq = irfft2(A * Hf + (1 - A) * Gf)``;
    * spatial branch: ``s_sp = dwconv3(conv1([h, g]))``, a pointwise mix of the two streams
      and a depthwise 3x3 convolution for local context (a full 3x3 convolution over 2C
      channels would cost as much as two of the bottleneck's own convolutions);
    * discrepancy fusion: ``w = sigmoid(W_w |s_freq - s_sp|)``,
      ``s = w * s_freq + (1 - w) * s_sp``;
    * time modulation: ``s = GN(s) * (1 + scale(t)) + shift(t)``, and the result enters the
      flow through a time-dependent gate, ``h' = h + gate(t) * W_o s``, whose weights start
      at zero and bias at 0.1, so a fresh module starts close to the identity yet every
      parameter receives gradient from the first step.

    Args:
        channels: C of both streams.
        time_dim: size of the time embedding.
    """

    def __init__(self, channels: int, time_dim: int) -> None:
        super().__init__()
        self.spec_attn = nn.Conv2d(3 * channels, channels, 1)
        self.spatial = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 1),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
        )
        self.fuse_gate = nn.Conv2d(channels, channels, 1)
        self.norm = nn.GroupNorm(groups_for(channels), channels)
        self.film = nn.Linear(time_dim, 2 * channels)
        self.out = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Linear(time_dim, channels)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, 0.1)

    def forward(self, h: torch.Tensor, g: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        size = h.shape[-2:]
        # FFTs in float32: bf16 has no complex type and its spectra lose the small bins
        hf = torch.fft.rfft2(h.float(), norm="ortho")
        gf = torch.fft.rfft2(g.float(), norm="ortho")
        mags = torch.cat([hf.abs(), gf.abs(), (hf - gf).abs()], dim=1)
        attn = torch.sigmoid(self.spec_attn(torch.log1p(mags).to(h.dtype))).float()
        s_freq = torch.fft.irfft2(attn * hf + (1.0 - attn) * gf, s=size, norm="ortho").to(h.dtype)
        s_sp = self.spatial(torch.cat([h, g], dim=1))
        w = torch.sigmoid(self.fuse_gate((s_freq - s_sp).abs()))
        s = w * s_freq + (1.0 - w) * s_sp
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        s = self.norm(s) * (1.0 + scale) + shift
        return h + self.gate(temb)[:, :, None, None] * self.out(F.silu(s))
