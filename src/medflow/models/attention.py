"""The two MedFlowSeg modules: Dual-Branch Spatial Attention and Frequency-Aware Attention.

The papers give the ideas, not the equations; the formulation implemented here, with the
reasons for each choice, is written out in ``docs/MODEL.md``. Both modules take the flow
(trunk) features ``h`` and the image features ``g`` at the same scale, ``(B, C, H, W)`` each,
and return updated flow features of the same shape.

Each comes in two versions (``NetConfig.dbsa_version``, ``faa_version``): version 1
(:class:`DualBranchSpatialAttention`, :class:`FrequencyAwareAttention`) as first published
here, the default; version 2 (:class:`DualBranchSpatialAttentionV2`,
:class:`FrequencyAwareAttentionV2`) after the review of issue 15: DBSA's gate multiplies the
flow features, FAA's gate knows which frequency each bin is. Which is the better default
waits on an ablation (docs/MODEL.md 6.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medflow.models.embeddings import groups_for


class DualBranchSpatialAttention(nn.Module):
    """DBSA (version 1): image features enter the flow through two spatial gates at two scales.

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
    """FAA (version 1): spatial and spectral mixing of flow and image features, fused by
    discrepancy.

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

    def spectral_gate(
        self,
        hf: torch.Tensor,
        gf: torch.Tensor,
        size: tuple[int, int],
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``A`` in (0, 1), ``(B, C, H, W // 2 + 1)`` (float32), from the spectra ``hf``,
        ``gf`` of ``rfft2`` of planes of ``size`` ``(H, W)`` (which the spectra alone do not
        fix: ``W // 2 + 1`` columns come from two widths); ``dtype`` is the dtype the 1x1
        convolutions run in. This gate reads magnitudes only."""
        mags = torch.cat([hf.abs(), gf.abs(), (hf - gf).abs()], dim=1)
        return torch.sigmoid(self.spec_attn(torch.log1p(mags).to(dtype))).float()

    def forward(self, h: torch.Tensor, g: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        size = h.shape[-2:]
        # FFTs in float32: bf16 has no complex type and its spectra lose the small bins
        hf = torch.fft.rfft2(h.float(), norm="ortho")
        gf = torch.fft.rfft2(g.float(), norm="ortho")
        attn = self.spectral_gate(hf, gf, size, h.dtype)
        s_freq = torch.fft.irfft2(attn * hf + (1.0 - attn) * gf, s=size, norm="ortho").to(h.dtype)
        s_sp = self.spatial(torch.cat([h, g], dim=1))
        w = torch.sigmoid(self.fuse_gate((s_freq - s_sp).abs()))
        s = w * s_freq + (1.0 - w) * s_sp
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        s = self.norm(s) * (1.0 + scale) + shift
        return h + self.gate(temb)[:, :, None, None] * self.out(F.silu(s))


class DualBranchSpatialAttentionV2(nn.Module):
    """DBSA v2: image structure at several scales gates the flow features.

    * ``u, v = U(g), P(g)`` (one 1x1 convolution);
    * local branch: depthwise 3x3 convolutions of ``u`` at dilations ``dilations`` (receptive
      fields 3, 5, 9 for 1, 2, 4), each through SiLU, summed: edges, thin structures and
      regions of the image at once;
    * global branch: ``u`` averaged over the slice, a linear map: which channels matter in
      this image;
    * ``a = sigmoid(W_m local + W_c global)`` in (0, 1), per channel and pixel, and
      ``h' = a * h + v``.

    The gate multiplies the flow features ``h``, so image structure decides where the flow
    state is kept and where it is damped in favour of the injected image term ``v``; with
    ``h = 0`` the output is ``v`` exactly. The gate reads the image alone (no ``x_t``, no
    ``t``), as the issue asks: "gating the flow features by image structure". ``W_m``'s bias
    starts at 2 (a gate of 0.88), so a fresh module is close to the plain injection
    ``h + P(g)``.

    Args:
        channels: C of both streams.
        dilations: dilations of the local branch's depthwise convolutions.
    """

    def __init__(self, channels: int, dilations: tuple[int, ...] = (1, 2, 4)) -> None:
        super().__init__()
        self.embed = nn.Conv2d(channels, 2 * channels, 1)
        self.local = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=d, dilation=d, groups=channels)
            for d in dilations
        )
        self.mix = nn.Conv2d(channels, channels, 1)
        self.context = nn.Linear(channels, channels)
        nn.init.constant_(self.mix.bias, 2.0)

    def structure(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, v)``: the gate in (0, 1) and the injected term, both ``(B, C, H, W)``; they
        depend on the image features ``g`` alone."""
        u, v = self.embed(g).chunk(2, dim=1)
        local = sum(F.silu(conv(u)) for conv in self.local)
        glob = self.context(u.mean((2, 3)))[:, :, None, None]
        return torch.sigmoid(self.mix(local) + glob), v

    def forward(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a, v = self.structure(g)
        return torch.addcmul(v, a, h)


def frequency_position(height: int, width: int, bands: int, device=None) -> torch.Tensor:
    """Where each bin of an ``rfft2`` of an ``height x width`` plane lies in frequency:
    ``(1, bands + 2, height, width // 2 + 1)`` float32.

    Frequencies are in cycles per sample (``fftfreq``), so a bin's features name the same
    frequency of the feature grid at any plane size: patches and sliding windows of other
    sizes see the same function, sampled more or less densely. Channels: ``bands`` Gaussian
    bumps over the radius ``r = |f| / |f_max|`` (0 at DC, 1 at the corner
    ``(0.5, 0.5)``), then the orientation ``cos 2θ``, ``sin 2θ`` (0 at DC). Both are
    unchanged by ``f -> -f``, so the gate is the same at a bin and at its conjugate and the
    gated spectrum stays that of a real plane; ``sin 2θ`` is set to 0 on the Nyquist column
    of an even width, whose bins ``(fy, 1/2)`` and ``(-fy, 1/2)`` are conjugates of each
    other, both stored.
    """
    if bands < 2:
        raise ValueError(f"bands must be >= 2, got {bands}")
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    r2 = fy * fy + fx * fx
    radius = torch.sqrt(2.0 * r2)
    centres = torch.linspace(0.0, 1.0, bands, device=device)[:, None, None]
    radial = torch.exp(-(((radius - centres) * (bands - 1)) ** 2))
    safe = torch.where(r2 > 0, r2, torch.ones_like(r2))
    cos2 = (fx * fx - fy * fy) / safe
    sin2 = 2.0 * fx * fy / safe * (fx < 0.5)
    orient = torch.stack(torch.broadcast_tensors(cos2, sin2))
    return torch.cat([radial, orient], dim=0)[None]


class FrequencyAwareAttentionV2(FrequencyAwareAttention):
    """FAA v2: FAA whose spectral gate also knows which frequency each bin is.

    The gate of :class:`FrequencyAwareAttention` is a 1x1 convolution over magnitudes: the
    same magnitudes give the same gate at DC and at the Nyquist frequency, so it is
    magnitude-aware, not frequency-aware. Here the frequency position of every bin
    (:func:`frequency_position`) goes through a pointwise MLP to a scale and a shift of the
    gate's logits, per channel and bin:

        A = sigmoid( W_a [log|Hf|, log|Gf|, log|Hf - Gf|] * (1 + s(f)) + b(f) )

    so each channel learns a filter over frequency (``b``) and how strongly the spectra's
    content moves it there (``s``). Everything else, the spatial branch, the discrepancy
    fusion and the time modulation, is FAA's. The MLP reads continuous frequencies, so the
    module runs at any ``H x W``.

    Args:
        channels: C of both streams.
        time_dim: size of the time embedding.
        bands: radial bands of the frequency position.
        hidden: width of the position MLP.
    """

    def __init__(self, channels: int, time_dim: int, bands: int = 8, hidden: int = 32) -> None:
        super().__init__(channels, time_dim)
        self.bands = bands
        self.freq_embed = nn.Sequential(
            nn.Conv2d(bands + 2, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, 2 * channels, 1)
        )

    def spectral_gate(
        self,
        hf: torch.Tensor,
        gf: torch.Tensor,
        size: tuple[int, int],
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        mags = torch.cat([hf.abs(), gf.abs(), (hf - gf).abs()], dim=1)
        logits = self.spec_attn(torch.log1p(mags).to(dtype)).float()
        pos = frequency_position(size[0], size[1], self.bands, hf.device)
        scale, shift = self.freq_embed(pos.to(dtype)).float().chunk(2, dim=1)
        return torch.sigmoid(logits * (1.0 + scale) + shift)
