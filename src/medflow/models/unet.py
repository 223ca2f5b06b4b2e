"""The MedFlowSeg velocity network and the plain UNet built from the same backbone code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medflow.models.attention import DualBranchSpatialAttention, FrequencyAwareAttention
from medflow.models.embeddings import (
    LevelsConfig,
    SinusoidalTimeEmbedding,
    groups_for,
    unet_levels,
)


@dataclass(frozen=True)
class NetConfig(LevelsConfig):
    """Architecture of a segmentation network; stored in every checkpoint.

    Attributes:
        in_channels: image channels (modalities).
        num_classes: K, background included; the flow state has K channels.
        channels: feature channels per resolution level; level ``l`` works at ``1 / 2**l``
            of the input size, so inputs must be divisible by ``2**(len(channels) - 1)``.
        flow: True for the MedFlowSeg velocity network ``(x_t, t, image)``; False for the
            plain discriminative UNet ``(image)`` with no flow state and no time.
        dbsa: inject image features through Dual-Branch Spatial Attention on every level
            below full resolution (else, and at full resolution, by addition). Only with
            ``flow``.
        faa: Frequency-Aware Attention at the bottleneck. Only with ``flow``.
        image_branch: the light image encoder whose features enter every level. Off (with
            ``dbsa`` and ``faa`` off, which need it), the image reaches the flow network only
            through the stem, concatenated with ``x_t``: a plain conditional UNet, kept to
            measure what the branch contributes.
        time_dim: width of the time embedding.
        step_input: the flow network also reads a jump size ``d`` in [0, 1] (embedded like
            ``t`` and added to the time embedding): ``d = 0`` is the instantaneous velocity
            (the posterior mean's field), ``d > 0`` the average velocity over a jump of size
            ``d`` (shortcut model, :mod:`medflow.flows.shortcut`), so one evaluation with
            ``d = 1`` from noise is a posterior sample. Only with ``flow``; checkpoints
            written before it existed load with it off.
        self_condition: the flow network also reads an estimate of the endpoint (class
            probabilities ``(B, K, H, W)``, concatenated at the stem after the image; zeros
            when there is none): the previous step's estimate while sampling, its own
            detached first pass on half of every training batch (self-conditioning, Chen et
            al. 2022). Only with ``flow``; checkpoints written before it existed load with it
            off.
        dropout: dropout rate in every residual block (0: none). A plain UNet with dropout
            is the Monte-Carlo dropout baseline: ``samples > 1`` keeps dropout on at
            inference, one mask per draw.
    """

    in_channels: int
    num_classes: int
    channels: tuple[int, ...] = (16, 32, 64, 128)
    flow: bool = True
    dbsa: bool = True
    faa: bool = True
    image_branch: bool = True
    time_dim: int = 128
    step_input: bool = False
    self_condition: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.step_input and not self.flow:
            raise ValueError("step_input needs a flow network (flow=True)")
        if self.self_condition and not self.flow:
            raise ValueError("self_condition needs a flow network (flow=True)")
        if self.flow and not self.image_branch and (self.dbsa or self.faa):
            raise ValueError("dbsa and faa need the image branch (image_branch=True)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.in_channels < 1 or self.num_classes < 2:
            raise ValueError(f"need in_channels >= 1 and num_classes >= 2, got {self}")
        self._check_levels()


class SegNet(nn.Module):
    """UNet-family backbone; the MedFlowSeg velocity network when ``cfg.flow`` is set.

    Flow mode: ``forward(x_t (B, K, H, W), t (B,), image (B, C, H, W)) -> logits (B, K, H, W)``.
    The trunk reads ``[x_t, image]``; every residual block is modulated by the time
    embedding; a light image encoder produces features at every level that enter the trunk
    through DBSA (by addition at full resolution), and FAA mixes trunk and image spectra at
    the bottleneck. The logits parameterise the predicted endpoint (see
    :mod:`medflow.flows.parameterization`).

    Plain mode: ``forward(image) -> logits``, the same trunk without flow state, time or
    image branch: the cost floor for a comparison.
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        tdim = cfg.time_dim if cfg.flow else None
        self.time = SinusoidalTimeEmbedding(cfg.time_dim) if cfg.flow else None
        self.step = SinusoidalTimeEmbedding(cfg.time_dim) if cfg.step_input else None
        # flow mode reads [x_t, image] (and the endpoint estimate when self-conditioned);
        # the estimate's channels come last, so networks without it keep their stem
        stem_in = cfg.in_channels + cfg.num_classes * (int(cfg.flow) + int(cfg.self_condition))
        self.stem = nn.Conv2d(stem_in, ch[0], 3, padding=1)

        if cfg.flow and cfg.image_branch:
            # the image branch sees no time: its features are the same for every step
            self.cond_stem = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
            self.cond_down = nn.ModuleList(
                nn.Sequential(
                    nn.Conv2d(ch[i - 1], ch[i], 3, stride=2, padding=1),
                    nn.GroupNorm(groups_for(ch[i]), ch[i]),
                    nn.SiLU(),
                )
                for i in range(1, len(ch))
            )
            # DBSA on every downsampled level; at full resolution the trunk's stem reads the
            # image itself and DBSA would cost as much as a residual block, so its features
            # are added there (docs/MODEL.md)
            self.dbsa = nn.ModuleDict(
                {str(i): DualBranchSpatialAttention(ch[i]) for i in range(1, len(ch)) if cfg.dbsa}
            )
            self.faa = FrequencyAwareAttention(ch[-1], cfg.time_dim) if cfg.faa else None

        self.enc, self.down, self.mid, self.up, self.dec = unet_levels(ch, tdim, cfg.dropout)
        self.head = nn.Sequential(
            nn.GroupNorm(groups_for(ch[0]), ch[0]), nn.SiLU(), nn.Conv2d(ch[0], cfg.num_classes, 1)
        )

    def image_features(self, image: torch.Tensor) -> list[torch.Tensor] | None:
        """Image-branch features at every level (None without the branch); independent of
        ``x_t`` and ``t``, so a multi-step sampler may compute them once per image."""
        if not (self.cfg.flow and self.cfg.image_branch):
            return None
        g = [self.cond_stem(image)]
        for down in self.cond_down:
            g.append(down(g[-1]))
        return g

    def _check(self, image: torch.Tensor) -> None:
        m = self.cfg.size_multiple
        if image.ndim != 4 or image.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"image must be (B, {self.cfg.in_channels}, H, W), got {tuple(image.shape)}"
            )
        if image.shape[-2] % m or image.shape[-1] % m:
            raise ValueError(f"H and W must be multiples of {m}, got {tuple(image.shape[-2:])}")

    def forward(
        self,
        *args: torch.Tensor,
        feats: list[torch.Tensor] | None = None,
        step: torch.Tensor | None = None,
        estimate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow mode ``(x_t, t, image)``, plain mode ``(image)``; ``step`` ``(B,)`` is the
        jump size of a network with ``step_input`` (None: 0, the instantaneous velocity);
        ``estimate`` ``(B, K, H, W)`` the endpoint estimate of a network with
        ``self_condition`` (None: zeros, no estimate)."""
        if estimate is not None and not self.cfg.self_condition:
            raise ValueError("this network reads no estimate (self_condition=False)")
        if self.cfg.flow:
            x_t, t, image = args
            self._check(image)
            temb = self.time(t)
            if self.step is not None:
                temb = temb + self.step(torch.zeros_like(t) if step is None else step)
            elif step is not None:
                raise ValueError("this network has no step input (step_input=False)")
            g = None
            if self.cfg.image_branch:
                g = feats if feats is not None else self.image_features(image)
            inputs = [x_t, image]
            if self.cfg.self_condition:
                inputs.append(torch.zeros_like(x_t) if estimate is None else estimate.to(x_t))
            h = self.stem(torch.cat(inputs, dim=1))
        else:
            (image,) = args
            self._check(image)
            temb, g = None, None
            h = self.stem(image)

        skips = []
        for i, block in enumerate(self.enc):
            h = block(h, temb)
            if g is not None:
                h = self.dbsa[str(i)](h, g[i]) if str(i) in self.dbsa else h + g[i]
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)
        h = self.mid(h, temb)
        if g is not None and self.faa is not None:
            h = self.faa(h, g[-1], temb)
        for up, dec in zip(self.up, self.dec):
            skip = skips.pop()
            h = up(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
            h = dec(torch.cat([h, skip], dim=1), temb)
        return self.head(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
