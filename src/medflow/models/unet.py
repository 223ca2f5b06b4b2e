"""The MedFlowSeg velocity network and the plain UNet built from the same backbone code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medflow.models.attention import (
    DualBranchSpatialAttention,
    DualBranchSpatialAttentionV2,
    FrequencyAwareAttention,
    FrequencyAwareAttentionV2,
)
from medflow.models.embeddings import (
    LevelsConfig,
    SinusoidalTimeEmbedding,
    groups_for,
    unet_levels,
)

# the modules a stored network config lacking these fields was built with (the published
# DBSA and FAA, FAA at the bottleneck only), whatever today's defaults are
PRE_FIELD_DEFAULTS = {"dbsa_version": 1, "faa_version": 1, "faa_levels": 1}
# the module of each version (NetConfig.dbsa_version, faa_version)
DBSA = {1: DualBranchSpatialAttention, 2: DualBranchSpatialAttentionV2}
FAA = {1: FrequencyAwareAttention, 2: FrequencyAwareAttentionV2}
VERSIONS = tuple(DBSA)


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
        faa: Frequency-Aware Attention at the bottleneck (and the next ``faa_levels - 1``
            finer levels). Only with ``flow``.
        dbsa_version: 1, the published DBSA (:class:`DualBranchSpatialAttention`: gates on
            projected image features, read from both streams), or 2
            (:class:`DualBranchSpatialAttentionV2`: image structure at several scales gates
            the flow features). docs/MODEL.md §6.1.
        faa_version: 1, the published FAA (:class:`FrequencyAwareAttention`: a spectral gate
            over magnitudes), or 2 (:class:`FrequencyAwareAttentionV2`: the gate also reads
            each bin's frequency). docs/MODEL.md §6.2.
        faa_levels: how many of the coarsest levels carry FAA: 1 is the bottleneck alone;
            ``n`` adds it after the decoder blocks of the ``n - 1`` next finer levels (at
            most ``len(channels)``, the last being full resolution).
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
    dbsa_version: int = 1
    faa_version: int = 1
    faa_levels: int = 1
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
        if self.dbsa_version not in VERSIONS or self.faa_version not in VERSIONS:
            raise ValueError(
                f"dbsa_version and faa_version must be in {VERSIONS}, got "
                f"{self.dbsa_version} and {self.faa_version}"
            )
        if not 1 <= self.faa_levels <= len(self.channels):
            raise ValueError(
                f"faa_levels must be in 1..{len(self.channels)} (one per level of "
                f"{tuple(self.channels)}), got {self.faa_levels}"
            )
        if self.in_channels < 1 or self.num_classes < 2:
            raise ValueError(f"need in_channels >= 1 and num_classes >= 2, got {self}")
        self._check_levels()

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        """Read a stored config; fields it lacks take the value it was built with."""
        return super().from_dict({**PRE_FIELD_DEFAULTS, **d})


class SegNet(nn.Module):
    """UNet-family backbone; the MedFlowSeg velocity network when ``cfg.flow`` is set.

    Flow mode: ``forward(x_t (B, K, H, W), t (B,), image (B, C, H, W)) -> logits (B, K, H, W)``.
    The trunk reads ``[x_t, image]``; every residual block is modulated by the time
    embedding; a light image encoder produces features at every level that enter the trunk
    through DBSA (by addition at full resolution), and FAA mixes trunk and image spectra at
    the bottleneck (and after the decoder blocks of ``faa_levels - 1`` finer levels); each
    module in the version ``cfg`` names (docs/MODEL.md §6.1, §6.2). The logits parameterise
    the predicted endpoint (see :mod:`medflow.flows.parameterization`).

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
            dbsa = DBSA[cfg.dbsa_version]
            self.dbsa = nn.ModuleDict({str(i): dbsa(ch[i]) for i in range(1, len(ch)) if cfg.dbsa})
            faa = FAA[cfg.faa_version]
            self.faa = faa(ch[-1], cfg.time_dim) if cfg.faa else None
            # FAA on finer levels acts after their decoder blocks (docs/MODEL.md §6.2); keyed
            # by level, empty for the published network, whose state dict it leaves unchanged
            finer = range(len(ch) - cfg.faa_levels, len(ch) - 1) if cfg.faa else ()
            self.faa_dec = nn.ModuleDict({str(i): faa(ch[i], cfg.time_dim) for i in finer})

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
        # the decoder runs from level L - 2 up to full resolution
        for level, up, dec in zip(reversed(range(len(self.up))), self.up, self.dec):
            skip = skips.pop()
            h = up(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
            h = dec(torch.cat([h, skip], dim=1), temb)
            if g is not None and str(level) in self.faa_dec:
                h = self.faa_dec[str(level)](h, g[level], temb)
        return self.head(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
