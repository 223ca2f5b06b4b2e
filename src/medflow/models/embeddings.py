"""Time embedding, the time-modulated residual block, the UNet trunk and the config
conventions shared by the backbones."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn


class LevelsConfig:
    """What the backbones' frozen config dataclasses share: a ``channels`` tuple with one
    entry per resolution level, and a dict form stored in checkpoints."""

    channels: tuple[int, ...]

    def _check_levels(self) -> None:
        """Refuse fewer than two levels; store ``channels`` as a tuple of ints."""
        if len(self.channels) < 2:
            raise ValueError(f"need at least two resolution levels, got {self.channels}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{**d, "channels": tuple(d["channels"])})


def groups_for(channels: int) -> int:
    """Largest of 8, 4, 2, 1 that divides ``channels`` (GroupNorm needs a divisor)."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class SinusoidalTimeEmbedding(nn.Module):
    """``t`` in [0, 1] of shape ``(B,)`` -> ``(B, dim)`` via sinusoids and a two-layer MLP.

    ``t`` is scaled by 1000 first so the lowest frequencies still resolve small time steps,
    as in DDPM's integer-timestep embedding.
    """

    def __init__(self, dim: int, freq_dim: int = 64) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * 1000.0 * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=1))


class ResBlock(nn.Module):
    """Pre-norm residual block; with ``time_dim`` its second norm is modulated by
    scale-and-shift from the time embedding (``GN(h) * (1 + s) + b``, as in improved DDPM).

    Shapes: ``(B, C_in, H, W)`` -> ``(B, C_out, H, W)``.
    """

    def __init__(
        self, c_in: int, c_out: int, time_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups_for(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups_for(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.act = nn.SiLU()
        self.film = nn.Linear(time_dim, 2 * c_out) if time_dim else None
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        # before the second convolution, as in improved DDPM's blocks; kept on at inference
        # for Monte-Carlo dropout (medflow.segmentation.inference)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1.0 + scale) + shift
        h = self.conv2(self.dropout(self.act(h)))
        return self.skip(x) + h


def unet_levels(
    channels: tuple[int, ...], time_dim: int | None, dropout: float = 0.0
) -> tuple[nn.ModuleList, nn.ModuleList, ResBlock, nn.ModuleList, nn.ModuleList]:
    """The encoder-decoder trunk shared by the backbones: per level a residual block and a
    stride-2 convolution down, a residual block at the bottleneck, then per level (coarse to
    fine) a convolution after nearest upsampling and a residual block over ``[up, skip]``.
    Returns ``(enc, down, mid, up, dec)``; the first block reads ``channels[0]`` channels;
    every residual block drops ``dropout`` of its features (0: none)."""
    enc, down = nn.ModuleList(), nn.ModuleList()
    c_prev = channels[0]
    for i, c in enumerate(channels):
        enc.append(ResBlock(c_prev, c, time_dim, dropout))
        if i < len(channels) - 1:
            down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        c_prev = c
    mid = ResBlock(channels[-1], channels[-1], time_dim, dropout)
    up, dec = nn.ModuleList(), nn.ModuleList()
    for i in reversed(range(len(channels) - 1)):
        up.append(nn.Conv2d(channels[i + 1], channels[i], 3, padding=1))
        dec.append(ResBlock(2 * channels[i], channels[i], time_dim, dropout))
    return enc, down, mid, up, dec
