"""A time-conditioned UNet for generative flows (AlignFlow's mask flow and image flow).

The same backbone family as :class:`medflow.models.unet.SegNet` (its residual blocks with
time scale-and-shift and its time embedding), without the segmentation-specific image branch:
a generative flow has no image to segment, only a state to move and, optionally, a spatial
condition (the mask, for the image flow) and a vector condition (the classes present, for
the class-conditioned mask flow).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medflow.models.embeddings import (
    LevelsConfig,
    SinusoidalTimeEmbedding,
    groups_for,
    unet_levels,
)


@dataclass(frozen=True)
class FlowUNetConfig(LevelsConfig):
    """Architecture of a generative velocity network; stored in synthesis checkpoints.

    Attributes:
        state_channels: channels of the flowing state (and of the velocity).
        cond_channels: channels of a spatial condition concatenated with the state (0: none).
        vector_dim: width of a vector condition added to the time embedding (0: none).
        channels: feature channels per resolution level.
        time_dim: width of the time embedding.
    """

    state_channels: int
    cond_channels: int = 0
    vector_dim: int = 0
    channels: tuple[int, ...] = (32, 64, 128)
    time_dim: int = 128

    def __post_init__(self) -> None:
        if self.state_channels < 1 or self.cond_channels < 0 or self.vector_dim < 0:
            raise ValueError(f"bad channel counts in {self}")
        self._check_levels()


class FlowUNet(nn.Module):
    """``forward(x_t (B, S, H, W), t (B,), cond (B, C, H, W) | None, vec (B, V) | None)
    -> velocity (B, S, H, W)``.

    The output layer starts at zero, so an untrained network is the zero field: fine-tuning
    and short runs start from "stay where you are" rather than from random velocities.
    """

    def __init__(self, cfg: FlowUNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch, tdim = cfg.channels, cfg.time_dim
        self.time = SinusoidalTimeEmbedding(tdim)
        self.vec = nn.Linear(cfg.vector_dim, tdim) if cfg.vector_dim else None
        self.stem = nn.Conv2d(cfg.state_channels + cfg.cond_channels, ch[0], 3, padding=1)
        self.enc, self.down, self.mid, self.up, self.dec = unet_levels(ch, tdim)
        self.head = nn.Sequential(
            nn.GroupNorm(groups_for(ch[0]), ch[0]),
            nn.SiLU(),
            nn.Conv2d(ch[0], cfg.state_channels, 3, padding=1),
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        vec: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        m = cfg.size_multiple
        if x_t.ndim != 4 or x_t.shape[1] != cfg.state_channels:
            raise ValueError(
                f"state must be (B, {cfg.state_channels}, H, W), got {tuple(x_t.shape)}"
            )
        if x_t.shape[-2] % m or x_t.shape[-1] % m:
            raise ValueError(f"H and W must be multiples of {m}, got {tuple(x_t.shape[-2:])}")
        if (cond is None) != (cfg.cond_channels == 0):
            raise ValueError(f"network built with cond_channels={cfg.cond_channels}")
        if (vec is None) != (cfg.vector_dim == 0):
            raise ValueError(f"network built with vector_dim={cfg.vector_dim}")
        temb = self.time(t)
        if self.vec is not None:
            temb = temb + self.vec(vec)
        h = self.stem(x_t if cond is None else torch.cat([x_t, cond], dim=1))
        skips = []
        for i, block in enumerate(self.enc):
            h = block(h, temb)
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)
        h = self.mid(h, temb)
        for up, dec in zip(self.up, self.dec):
            skip = skips.pop()
            h = up(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
            h = dec(torch.cat([h, skip], dim=1), temb)
        return self.head(h)
