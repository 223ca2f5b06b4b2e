"""The alignment reward: squared MMD between features of generated images and of K unlabeled
reference images from the target site, in the feature space of a frozen random encoder.

Why a random encoder: random multi-scale convolutions with a ReLU keep the texture and
intensity statistics of an image (Ustyuzhaninov et al. 2017, "What does it take to generate
natural textures?"), they need neither a download nor a training run, and the same seed gives
the same encoder on any machine. A segmenter's features would be a worse choice: they are
trained to be invariant to exactly the intensity changes this reward must see.

What the features are meant to see, per site difference:

* gamma / contrast change: the soft intensity histogram and the moments (tissue peaks move);
* noise: the spread of the full-resolution filter responses (more high-frequency energy);
* lower resolution (blur): the same responses, the other way (less high-frequency energy);
* bias field: a broadened histogram and the coarse levels' spatial spread. This is the
  weakest of the four: with few references it shows only once the field is strong, and
  the spatially pooled statistics have no feature made for a smooth gain.

``synth align`` computes the features on the images as the segmenter will see them
(:mod:`medflow.synthesis.view`) and over the tissue only (a foreground mask), so the
statistics describe the head rather than the fraction of the frame the background fills.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medflow.metrics.distribution import MEDIAN_MULTIPLES, median_distance, mmd2

# added to variances before a square root: the gradient of sqrt at 0 is infinite, and a flat
# image (or a filter that never fires on one) has zero spatial variance
_VAR_EPS = 1e-6

# a feature's scale is floored at this fraction of its group's root-mean-square spread, so
# a feature that is constant over the pool (the mean and std of z-scored images) is not
# divided by ~0 and turned into amplified rounding noise
_FLOOR = 0.1


def _weighted_stats(flat: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (population, ``_VAR_EPS`` added to the variance) of ``flat`` ``(B, C, N)``
    over its last axis with weights ``w`` ``(B, 1, N)``; equal weights give the plain ones."""
    mean = (flat * w).sum(2) / w.sum(2)
    var = ((flat - mean[..., None]) ** 2 * w).sum(2) / w.sum(2)
    return mean, (var + _VAR_EPS).sqrt()


def _weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Pixel weights ``(B, 1, H*W)`` at the resolution of ``like`` ``(B, C, H, W)``: the
    foreground ``mask`` ``(B, 1, H0, W0)`` area-averaged to ``H x W``, or all ones. An image
    without foreground counts all its pixels rather than none."""
    if mask is None:
        return torch.ones_like(like[:, :1]).flatten(2)
    w = F.adaptive_avg_pool2d(mask.to(like.dtype), like.shape[-2:]).flatten(2)
    empty = w.sum(2, keepdim=True) <= 0
    return torch.where(empty, torch.ones_like(w), w)


class FeatureEncoder(nn.Module):
    """Frozen, seeded, randomly initialised multi-scale conv encoder: images -> style vectors.

    Layers: ``len(widths)`` conv3x3 + ReLU, the first with stride 1 and the others with stride
    2, replicate padding (zero padding would add a fake edge at the border of any image whose
    background is not 0, as z-scored ones are not). Weights are He-normal and biases
    PyTorch's default uniform range, both drawn from ``torch.Generator().manual_seed(seed)``.

    Features, concatenated in this order (see :attr:`groups`), per input channel ``C``:

    * moments of the raw intensities: mean, std, skewness, excess kurtosis (``4 C``);
    * a soft intensity histogram (``bins * C``): each pixel is spread over ``bins`` centres in
      ``value_range`` by a softmax of ``-(x - c)^2 / (2 s^2)``, ``s`` half the bin spacing,
      so it sums to 1 per channel and is differentiable; values outside the range land in
      the end bins;
    * per conv level ``w``, the spatial mean and std of each channel's activation
      (``2 w``; the style statistics of Gatys/Huang and Belongie's AdaIN).

    With a foreground ``mask``, every statistic (moments, histogram, each level's spatial
    mean and std) is taken over the foreground pixels only (the mask area-averaged to each
    level's resolution), so the features describe the tissue and not how much of the frame
    the background fills; the convolutions still see the whole image, edges included.

    The encoder expects z-scored images (``value_range`` and the He scaling assume intensities
    of order 1), accepts any ``H, W >= 1``, is differentiable w.r.t. its input, and stays in
    eval mode and frozen whatever a parent module does.

    Args:
        in_channels: image channels ``C``.
        widths: channels of the conv levels.
        seed: seed of the weights.
        bins: soft-histogram bins per channel.
        value_range: centres of the first and the last bin.

    Shapes: ``(B, C, H, W)`` and an optional ``(B, 1, H, W)`` mask -> ``(B, feature_dim)``.
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int] = (32, 64, 128),
        seed: int = 0,
        bins: int = 16,
        value_range: tuple[float, float] = (-4.0, 4.0),
    ) -> None:
        super().__init__()
        if in_channels < 1 or not widths or min(widths) < 1:
            raise ValueError(f"need in_channels >= 1 and widths >= 1, got {in_channels}, {widths}")
        if bins < 2 or not value_range[0] < value_range[1]:
            raise ValueError(f"need bins >= 2 and an increasing range, got {bins}, {value_range}")
        gen = torch.Generator().manual_seed(seed)
        convs = []
        c_in = in_channels
        for i, width in enumerate(widths):
            conv = nn.Conv2d(
                c_in, width, 3, stride=1 if i == 0 else 2, padding=1, padding_mode="replicate"
            )
            fan_in = c_in * 9
            with torch.no_grad():
                # He scaling keeps the activations of order 1 at every depth behind a ReLU
                conv.weight.copy_(
                    torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in)
                )
                # random biases make the units fire at different intensity levels; with zero
                # biases every unit would scale linearly with the contrast
                conv.bias.copy_((2.0 * torch.rand(width, generator=gen) - 1.0) / math.sqrt(fan_in))
            convs.append(conv)
            c_in = width
        self.convs = nn.ModuleList(convs)
        self.in_channels = in_channels
        self.widths = tuple(widths)
        lo, hi = value_range
        self.register_buffer("centres", torch.linspace(lo, hi, bins), persistent=False)
        self.bin_sigma = (hi - lo) / (bins - 1) / 2.0
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureEncoder:
        # a parent's .train() must not change the encoder: the reward is a fixed yardstick
        return super().train(False)

    @property
    def groups(self) -> tuple[int, ...]:
        """Sizes of the feature groups, in output order: moments, histogram, one per level."""
        c = self.in_channels
        return (4 * c, len(self.centres) * c, *(2 * w for w in self.widths))

    @property
    def feature_dim(self) -> int:
        """Length ``D`` of a feature vector."""
        return sum(self.groups)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        if mask is not None and mask.shape != (x.shape[0], 1, *x.shape[2:]):
            raise ValueError(
                f"mask must be (B, 1, H, W) = {(x.shape[0], 1, *x.shape[2:])}, "
                f"got {tuple(mask.shape)}"
            )
        return torch.cat([*self._intensity(x, mask), *self._style(x, mask)], dim=1)

    def _intensity(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        b = x.shape[0]
        flat, w = x.flatten(2), _weights(mask, x)
        mean, std = _weighted_stats(flat, w)
        z = (flat - mean[..., None]) / std[..., None]
        n = w.sum(2)
        skew, kurt = (z.pow(3) * w).sum(2) / n, (z.pow(4) * w).sum(2) / n - 3.0
        moments = torch.stack([mean, std, skew, kurt], dim=2)
        logits = -((flat[..., None] - self.centres) ** 2) / (2.0 * self.bin_sigma**2)
        hist = (logits.softmax(-1) * w[..., None]).sum(2) / n[..., None]
        return [moments.reshape(b, -1), hist.reshape(b, -1)]

    def _style(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        feats = []
        h = x
        for conv in self.convs:
            h = F.relu(conv(h))
            feats += list(_weighted_stats(h.flatten(2), _weights(mask, h)))
        return feats


def feature_scale(features: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    """Per-feature divisors that give every feature unit spread and every group equal weight.

    Feature ``d`` of group ``g`` is divided by ``sqrt(var_d + (FLOOR * rms_g)^2) * sqrt(|g|)``,
    where ``var_d`` is its variance over ``features`` and ``rms_g`` the root-mean-square std
    of its group. Unit spread: no single high-variance feature dominates the kernel distance.
    Equal group weight: the 448 conv statistics of the default encoder are strongly
    correlated, and without the ``sqrt(|g|)`` they would drown the 20 intensity features
    that see a contrast change best. The weights are equal when a group's features have
    comparable spreads; a feature near or below the floor counts for less (the mean and std
    of z-scored images count for nothing, so their group weighs half). The floor keeps such
    constant features from being amplified into rounding noise.

    Args:
        features: ``(N, D)`` features of the pool the scale is measured on, ``N >= 2``.
        groups: group sizes summing to ``D``.

    Returns:
        ``(D,)`` positive divisors.
    """
    if features.ndim != 2 or len(features) < 2 or sum(groups) != features.shape[1]:
        raise ValueError(
            f"need (N >= 2, {sum(groups)}) features for groups {tuple(groups)}, "
            f"got shape {tuple(features.shape)}"
        )
    var = features.var(0)
    parts = []
    for v in var.split(list(groups)):
        floor = _FLOOR**2 * v.mean()
        if floor == 0:
            # the whole group is constant over the pool: its spread says nothing, keep units
            parts.append(torch.ones_like(v))
        else:
            parts.append((v + floor).sqrt() * math.sqrt(len(v)))
    return torch.cat(parts)


class MMDReward(nn.Module):
    """Squared MMD between encoder features of images and of fixed reference images; a loss.

    The yardstick is fixed once, at construction, on a calibration pool: the features of
    ``scale_from`` (the stage-1 generator's images in ``synth align``) together with the same
    features translated so that their mean is the references' mean. The pool has the
    generator's spread and the gap between the sites, but not the references' own spread:

    * features are divided by :func:`feature_scale` of the pool;
    * the kernel widths are :data:`~medflow.metrics.distribution.MEDIAN_MULTIPLES` times the
      median pairwise distance of the standardised pool (unless ``bandwidths`` are given).

    Why (per-K calibration): when the scale and the widths were measured on the references
    themselves pooled with the generator's images, more (and more diverse: slices from all
    over the brain) references widened both, so the same generator was pushed less hard the
    larger K. K enters the pool now only through the references' mean, and the initial
    gradient of the reward is about the same for K = 1 and K = 10 (the calibration test in
    ``tests/synthesis/test_reward.py``). The gap is kept in the pool so that a generator far
    from the site still gets kernels wide enough to reach the references (a pool of the
    generator alone saturates them). The loss *value* still differs between K at the start:
    the V-statistic's reference self-term holds ``k(y, y) / K``, a constant without
    gradient; compare values within one K, not across K. A fixed scale and fixed widths
    keep the loss a function of the generated images alone, so it cannot fall by a
    rescaling of the feature space.

    Args:
        encoder: the (frozen) feature encoder.
        references: ``(K, C, H, W)`` target-site images, ``K >= 1``.
        ref_mask: ``(K, 1, H, W)`` foreground of the references (see
            :class:`FeatureEncoder`), or None for every pixel.
        scale_from: ``(N, C, H', W')`` calibration images, ``N >= 2``; None: the pool is the
            references themselves (then ``K >= 2``: one image has no spread).
        scale_mask: ``(N, 1, H', W')`` foreground of ``scale_from``, or None.
        bandwidths: kernel widths in standardised feature units, or None (see above).

    Call: ``reward(images (B, C, H, W), mask=None) -> scalar`` tensor, differentiable
    w.r.t. ``images``; ``mask`` ``(B, 1, H, W)`` is their foreground.
    """

    def __init__(
        self,
        encoder: FeatureEncoder,
        references: torch.Tensor,
        bandwidths: Sequence[float] | None = None,
        scale_from: torch.Tensor | None = None,
        *,
        ref_mask: torch.Tensor | None = None,
        scale_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if references.ndim != 4 or len(references) == 0:
            raise ValueError(f"references must be (K >= 1, C, H, W), got {tuple(references.shape)}")
        if scale_from is None and len(references) < 2:
            raise ValueError(
                "one reference image has no feature spread: pass scale_from (e.g. source images)"
            )
        self.encoder = encoder
        with torch.no_grad():
            ref = encoder(references, ref_mask)
            if scale_from is None:
                calib = ref
            else:
                gen = encoder(scale_from, scale_mask)
                calib = torch.cat([gen, gen - gen.mean(0) + ref.mean(0)])
            scale = feature_scale(calib, encoder.groups)
            if bandwidths is None:
                median = float(median_distance(calib / scale)) or 1.0
                bandwidths = [m * median for m in MEDIAN_MULTIPLES]
        self.bandwidths = tuple(float(b) for b in bandwidths)
        self.register_buffer("scale", scale)
        self.register_buffer("ref_features", ref / scale)

    def features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised features ``(B, D)`` of ``images`` ``(B, C, H, W)``."""
        return self.encoder(images, mask) / self.scale

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return mmd2(self.features(images, mask), self.ref_features, self.bandwidths)
