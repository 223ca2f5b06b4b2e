"""The alignment reward: squared MMD between features of generated images and of K unlabeled
reference images from the target site, in the feature space of a frozen encoder.

The encoder's features come in named groups (:class:`FeatureEncoder`, chosen by
``AlignConfig.reward_features``); each group is weighted equally by :func:`feature_scale`.
The default groups, the encoder's original features, are random-conv style statistics and
intensity statistics. Why a random encoder: random multi-scale convolutions with a ReLU keep
the texture and intensity statistics of an image (Ustyuzhaninov et al. 2017, "What does it
take to generate natural textures?"), they need neither a download nor a training run, and
the same seed gives the same encoder on any machine.

What each group is meant to see, per site difference:

* gamma / contrast change: ``"moments"`` and ``"histogram"`` (tissue peaks move), and
  ``"fine_histogram"`` (48 narrower bins, for small peak shifts);
* noise: the spread of the full-resolution conv responses (``"style"``) and the fine bands
  of ``"laplacian"`` (more high-frequency energy);
* lower resolution (blur): the same, the other way (less high-frequency energy);
* bias field: ``"lowfreq"``, the spread across the image of the local mean within each
  intensity class, made for a smooth gain and blind to a global one. The default groups see
  a bias only through a broadened histogram and the coarse levels' spatial spread, the
  weakest of their four.

``benchmarks/reward_features.py`` measures how far each group alone puts the simulated
site-b from the source, relative to the spread between slabs of one site (docs/ALIGNFLOW.md):
``"lowfreq"`` separates it best; ``"laplacian"`` sees every component of the shift alone but
hardly their sum, whose effects on the band energies nearly cancel.

The source segmenter's early features (the issue's suggestion: a segmenter that fails on
the target is not invariant to the shift) are the group ``"segmenter"``, computed from a
frozen ``extractor`` module handed to the encoder: the per-channel style statistics of its
feature maps, as ``"style"`` takes them of the random convs. The import direction is kept by
passing the module in: loading a segmenter checkpoint is ``medflow.segmentation``'s job
(:func:`medflow.segmentation.features.early_features`), and this module never imports it.
``early_features`` answers the flow segmenter's problem, a first layer that mixes the image
with the flow state and time, by taking its image branch, which sees neither; a flow network
without one is refused. ``synth align`` does not offer the group (measured no better at
telling the sites apart than the default features, docs/ALIGNFLOW.md; the harness could now
hand it a segmenter, as it hands the judge, :mod:`medflow.synthesis.judge`); it is named in
:data:`~medflow.synthesis.config.EXTRACTOR_FEATURES`, not in the groups a config may name.

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
from medflow.synthesis.config import (
    DEFAULT_REWARD_FEATURES,
    EXTRACTOR_FEATURES,
    check_reward_features,
)

# added to variances before a square root: the gradient of sqrt at 0 is infinite, and a flat
# image (or a filter that never fires on one) has zero spatial variance
_VAR_EPS = 1e-6

# a feature's scale is floored at this fraction of its group's root-mean-square spread, so
# a feature that is constant over the pool (the mean and std of z-scored images) is not
# divided by ~0 and turned into amplified rounding noise
_FLOOR = 0.1

# "fine_histogram": bins over the histogram's range (value_range); 48 over (-4, 4) puts a
# centre every 0.17 tissue standard deviations, three times as many as the 16 default bins
FINE_BINS = 48
# "laplacian": pyramid levels; 4 reach a band of ~16 pixels, coarser bands mostly see anatomy
LAPLACIAN_LEVELS = 4
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)  # Burt and Adelson's 5-tap approximation of a Gaussian
# "lowfreq": intensity classes, centred at -1, 0, 1 tissue standard deviations from the
# tissue mean (kernel width: half their spacing, as the histograms'), and the grid of cells
# the class means are compared over (cells of 16 x 16 pixels at 64 x 64)
LOWFREQ_CLASSES = 3
LOWFREQ_SPAN = 1.0
LOWFREQ_GRID = 4
_LOWFREQ_SIGMA = LOWFREQ_SPAN / (LOWFREQ_CLASSES - 1)
# "segmenter": side of the zeros image the extractor runs on once, at construction, to learn
# its channels; 32 is a multiple of the size multiple of a segmenter of up to six levels
PROBE_SIZE = 32


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
    """Frozen, seeded feature extractor: images -> feature vectors made of named groups.

    The groups (``features``, concatenated in the order named; :attr:`groups` gives their
    sizes for :func:`feature_scale`), per input channel ``C``:

    * ``"moments"``: mean, std, skewness, excess kurtosis of the raw intensities (``4 C``);
    * ``"histogram"``: a soft intensity histogram (``bins * C``): each pixel is spread over
      ``bins`` centres in ``value_range`` by a softmax of ``-(x - c)^2 / (2 s^2)``, ``s``
      half the bin spacing, so it sums to 1 per channel and is differentiable; values outside
      the range land in the end bins;
    * ``"style"``: per level of a random conv net of ``widths``, the spatial mean and std of
      each channel's activation (``2 w`` per level, one group per level; the style statistics
      of Gatys/Huang and Belongie's AdaIN);
    * ``"fine_histogram"``: the same soft histogram with :data:`FINE_BINS` bins over the same
      range, so narrower kernels (``FINE_BINS * C``): it resolves peak shifts (a contrast
      change) that the coarse bins average over;
    * ``"laplacian"``: per level of a :data:`LAPLACIAN_LEVELS`-level Laplacian pyramid, the log
      of the tissue's mean squared band-pass response (``LAPLACIAN_LEVELS * C``): blur lowers
      the fine bands' energy, noise raises it (:meth:`_laplacian`);
    * ``"lowfreq"``: the spatial spread of the coarse local mean within each of
      :data:`LOWFREQ_CLASSES` intensity classes (``LOWFREQ_CLASSES * C``), which sees a smooth
      multiplicative bias and hardly where the tissue lies (:meth:`_lowfreq`);
    * ``"segmenter"``: per feature map ``(B, c_i, h_i, w_i)`` of ``extractor``, the spatial
      mean and std of each channel, as ``"style"`` (``2 c_i`` per map, one group per map).
      Only with an ``extractor``, e.g. the source segmenter's early layers
      (:func:`medflow.segmentation.features.early_features`).

    The default ``features`` are the first three, the encoder's original features, computed
    exactly as before. The conv net is built, from ``seed``, whatever the selection, so a
    seed gives the same weights with any ``features``. Conv layers: ``len(widths)`` conv3x3 +
    ReLU, the first with stride 1 and the others with stride 2, replicate padding (zero
    padding would add a fake edge at the border of any image whose background is not 0, as
    z-scored ones are not). Weights are He-normal and biases PyTorch's default uniform range,
    both drawn from ``torch.Generator().manual_seed(seed)``.

    With a foreground ``mask``, every statistic is taken over the foreground pixels only (the
    mask area-averaged to each resolution), so the features describe the tissue and not how
    much of the frame the background fills; the convolutions still see the whole image,
    edges included, while the pyramid and the class means of ``"laplacian"`` and
    ``"lowfreq"`` average over tissue only (normalised convolution), so the head's outline
    does not count as image detail.

    The encoder expects z-scored images (``value_range`` and the He scaling assume intensities
    of order 1), accepts any ``H, W >= 1`` (with an ``extractor``, any size it takes), is
    differentiable w.r.t. its input, has no trainable parameters, and stays in eval mode and
    frozen whatever a parent module does, its ``extractor`` included.

    Args:
        in_channels: image channels ``C``.
        widths: channels of the conv levels.
        seed: seed of the weights.
        bins: soft-histogram bins per channel.
        value_range: centres of the first and the last bin (both histograms).
        features: the groups, by name (:data:`~medflow.synthesis.config.REWARD_FEATURES`,
            and ``"segmenter"`` with an ``extractor``).
        extractor: a module mapping images ``(B, C, H, W)`` to a list of feature maps
            ``[(B, c_i, h_i, w_i), ...]``, for ``"segmenter"``, which needs it, and refused
            without that group (a module that would be silently unused hides a mistake in
            ``features``). The encoder freezes it and puts it in eval mode (in place), then
            runs it once on zeros ``(1, C, PROBE_SIZE, PROBE_SIZE)`` to learn the ``c_i``.

    Shapes: ``(B, C, H, W)`` and an optional ``(B, 1, H, W)`` mask -> ``(B, feature_dim)``.
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int] = (32, 64, 128),
        seed: int = 0,
        bins: int = 16,
        value_range: tuple[float, float] = (-4.0, 4.0),
        features: Sequence[str] = DEFAULT_REWARD_FEATURES,
        extractor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or not widths or min(widths) < 1:
            raise ValueError(f"need in_channels >= 1 and widths >= 1, got {in_channels}, {widths}")
        if bins < 2 or not value_range[0] < value_range[1]:
            raise ValueError(f"need bins >= 2 and an increasing range, got {bins}, {value_range}")
        self.features = check_reward_features(features, EXTRACTOR_FEATURES)
        if "segmenter" in self.features and extractor is None:
            raise ValueError(
                "the reward feature 'segmenter' needs an extractor, e.g. "
                "medflow.segmentation.features.early_features(checkpoint)"
            )
        if extractor is not None and "segmenter" not in self.features:
            raise ValueError(
                f"an extractor is used only by the feature 'segmenter', not named in "
                f"features {list(self.features)}"
            )
        self.convs = _random_convs(in_channels, widths, seed)
        self.in_channels = in_channels
        self.widths = tuple(widths)
        lo, hi = value_range
        # buffers, not persistent: a state dict holds the conv weights only, as before
        self.register_buffer("centres", torch.linspace(lo, hi, bins), persistent=False)
        self.bin_sigma = (hi - lo) / (bins - 1) / 2.0
        self.register_buffer("fine_centres", torch.linspace(lo, hi, FINE_BINS), persistent=False)
        self.fine_sigma = (hi - lo) / (FINE_BINS - 1) / 2.0
        self.register_buffer("binomial", torch.tensor(_BINOMIAL) / 16.0, persistent=False)
        self.register_buffer(
            "class_centres",
            torch.linspace(-LOWFREQ_SPAN, LOWFREQ_SPAN, LOWFREQ_CLASSES),
            persistent=False,
        )
        # only with an extractor, so the default encoder's state dict keeps its keys
        self.segmenter_channels: tuple[int, ...] = ()
        if extractor is not None:
            self.extractor = extractor
            self.segmenter_channels = _probe_channels(extractor, in_channels)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureEncoder:
        # a parent's .train() must not change the encoder: the reward is a fixed yardstick
        return super().train(False)

    @property
    def groups(self) -> tuple[int, ...]:
        """Sizes of the feature groups, in output order (``"style"`` is one group per level)."""
        c = self.in_channels
        sizes = {
            "moments": (4 * c,),
            "histogram": (len(self.centres) * c,),
            "style": tuple(2 * w for w in self.widths),
            "fine_histogram": (FINE_BINS * c,),
            "laplacian": (LAPLACIAN_LEVELS * c,),
            "lowfreq": (LOWFREQ_CLASSES * c,),
            "segmenter": tuple(2 * ci for ci in self.segmenter_channels),
        }
        return tuple(size for name in self.features for size in sizes[name])

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
        parts = [part for name in self.features for part in getattr(self, f"_{name}")(x, mask)]
        return torch.cat(parts, dim=1)

    def _moments(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        flat, w = x.flatten(2), _weights(mask, x)
        mean, std = _weighted_stats(flat, w)
        z = (flat - mean[..., None]) / std[..., None]
        n = w.sum(2)
        skew, kurt = (z.pow(3) * w).sum(2) / n, (z.pow(4) * w).sum(2) / n - 3.0
        return [torch.stack([mean, std, skew, kurt], dim=2).reshape(x.shape[0], -1)]

    def _histogram(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        return [_soft_histogram(x, _weights(mask, x), self.centres, self.bin_sigma)]

    def _fine_histogram(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        return [_soft_histogram(x, _weights(mask, x), self.fine_centres, self.fine_sigma)]

    def _style(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        feats = []
        h = x
        for conv in self.convs:
            h = F.relu(conv(h))
            feats += list(_weighted_stats(h.flatten(2), _weights(mask, h)))
        return feats

    def _segmenter(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        feats = []
        for h in self.extractor(x):
            feats += list(_weighted_stats(h.flatten(2), _weights(mask, h)))
        return feats

    def _laplacian(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Band energies of a Laplacian (difference-of-Gaussians) pyramid over the tissue.

        Level ``l`` holds ``g_l`` (``g_0 = x``) and the tissue weight ``w_l``; its band is
        ``g_l - L_l`` with ``L_l = blur(w_l g_l) / blur(w_l)`` the local tissue mean (a 5-tap
        binomial blur), and ``g_{l+1}, w_{l+1}`` are ``L_l, blur(w_l)`` subsampled by 2. The
        feature is ``log(mean over tissue of band^2)``. The normalised convolution keeps the
        background out of the local mean, so the head's outline is no band energy; the log
        makes a factor (twice the noise power) count the same at every level.
        """
        g, w = x, _tissue(mask, x)
        energies = []
        for _ in range(LAPLACIAN_LEVELS):
            blurred_w = _blur(w, self.binomial)
            local = _blur(g * w, self.binomial) / blurred_w.clamp_min(_VAR_EPS)
            energy = ((g - local) ** 2 * w).sum((2, 3)) / w.sum((2, 3))
            energies.append(torch.log(energy + _VAR_EPS))
            g, w = local[..., ::2, ::2], blurred_w[..., ::2, ::2]
        return [torch.stack(energies, dim=2).reshape(x.shape[0], -1)]

    def _lowfreq(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        """How much the coarse local mean of each intensity class varies across the image.

        A smooth gain ``b(r)`` scales all tissue at ``r`` by the same slowly varying factor,
        so the local mean of one tissue class follows ``b`` across the image; without a
        field it is about the same wherever that class lies. Raw coarse means would mostly
        say which tissue a cell holds, which changes from slice to slice; conditioning on
        the class takes the anatomy out. Per image and channel:

        1. the tissue is z-scored again, so a global gain and offset drop out exactly;
        2. each tissue pixel is shared among :data:`LOWFREQ_CLASSES` classes by a softmax of
           Gaussian kernels around centres at ``-LOWFREQ_SPAN .. LOWFREQ_SPAN``;
        3. over a ``LOWFREQ_GRID x LOWFREQ_GRID`` grid of cells, class ``k``'s mean ``m_kj``
           in cell ``j`` and its mass ``n_kj`` (the cell's share of class ``k``);
        4. the feature is the std over cells of ``m_kj``, cell ``j`` weighted by ``n_kj^2``:
           the square makes a cell that holds only the soft tail of a class (other tissue's
           small share of it) count little, where it would report that other tissue's
           intensity as the class's mean.

        Limits: the classes are intensity bands, not tissues, so a strong field also moves
        pixels between them and the spread saturates; a contrast change (gamma) reshapes
        the bands' contents and changes the feature too, and blur (partial volume at
        edges) a little. It sees a bias best of the groups, not only a bias.
        """
        b, c, h, wd = x.shape
        w = _weights(mask, x)  # (B, 1, H*W)
        mean, std = _weighted_stats(x.flatten(2), w)
        z = (x - mean[..., None, None]) / std[..., None, None]
        logits = -((z[..., None] - self.class_centres) ** 2) / (2.0 * _LOWFREQ_SIGMA**2)
        # (B, C, H, W, K) -> (B, C * K, H, W): each tissue pixel's share of each class
        share = (logits.softmax(-1) * w.view(b, 1, h, wd, 1)).permute(0, 1, 4, 2, 3)
        share = share.reshape(b, c * LOWFREQ_CLASSES, h, wd)
        zk = z.repeat_interleave(LOWFREQ_CLASSES, dim=1)
        grid = (min(LOWFREQ_GRID, h), min(LOWFREQ_GRID, wd))
        mass = F.adaptive_avg_pool2d(share, grid).flatten(2)
        local = F.adaptive_avg_pool2d(share * zk, grid).flatten(2) / mass.clamp_min(_VAR_EPS)
        weight = mass**2
        total = weight.sum(2, keepdim=True).clamp_min(_VAR_EPS**2)
        centre = (local * weight).sum(2, keepdim=True) / total
        spread = ((local - centre) ** 2 * weight).sum(2) / total[..., 0]
        return [(spread + _VAR_EPS).sqrt().reshape(b, -1)]


def _random_convs(in_channels: int, widths: Sequence[int], seed: int) -> nn.ModuleList:
    """The conv levels of :class:`FeatureEncoder`, drawn from ``seed``."""
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
    return nn.ModuleList(convs)


def _probe_channels(extractor: nn.Module, in_channels: int) -> tuple[int, ...]:
    """The channels ``c_i`` of ``extractor``'s feature maps, from one run on zeros
    ``(1, in_channels, PROBE_SIZE, PROBE_SIZE)``; ``extractor`` is frozen and put in eval
    mode first (in train mode the run would update batch-norm statistics).

    Raises:
        ValueError: it does not take such images or returns no list of ``(1, c, h, w)`` maps.
    """
    extractor.requires_grad_(False).eval()
    # on the extractor's device, in its dtype
    like = next(
        (t for t in (*extractor.parameters(), *extractor.buffers()) if t.is_floating_point()), None
    )
    probe = torch.zeros(1, in_channels, PROBE_SIZE, PROBE_SIZE)
    if like is not None:
        probe = probe.to(like.device, like.dtype)
    shape = tuple(probe.shape)
    try:
        with torch.no_grad():
            maps = extractor(probe)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"the extractor does not take images {shape}: {exc}") from exc
    if not isinstance(maps, (list, tuple)) or not maps:
        raise ValueError(f"the extractor must return a list of feature maps, got {type(maps)}")
    if not all(isinstance(m, torch.Tensor) and m.ndim == 4 and len(m) == 1 for m in maps):
        got = [tuple(m.shape) if isinstance(m, torch.Tensor) else type(m) for m in maps]
        raise ValueError(f"the extractor must map {shape} to (1, c, h, w) maps, got {got}")
    return tuple(int(m.shape[1]) for m in maps)


def _soft_histogram(
    x: torch.Tensor, w: torch.Tensor, centres: torch.Tensor, sigma: float
) -> torch.Tensor:
    """Soft histogram ``(B, C * bins)`` of ``x`` ``(B, C, H, W)`` with pixel weights ``w``
    ``(B, 1, H*W)`` over ``centres`` ``(bins,)`` (softmax of Gaussian kernels of ``sigma``)."""
    flat, n = x.flatten(2), w.sum(2)
    logits = -((flat[..., None] - centres) ** 2) / (2.0 * sigma**2)
    hist = (logits.softmax(-1) * w[..., None]).sum(2) / n[..., None]
    return hist.reshape(x.shape[0], -1)


def _tissue(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Full-resolution tissue weights ``(B, 1, H, W)``: ``mask``, or ones (also for an image
    without foreground, as :func:`_weights`)."""
    b, _, h, w = like.shape
    return _weights(mask, like).view(b, 1, h, w)


def _blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable blur of each channel of ``x`` ``(B, C, H, W)`` with ``taps`` ``(5,)``,
    replicate padding (as the conv levels: no fake edge at the frame's border)."""
    c = x.shape[1]
    taps = taps.to(x.dtype)
    rows, cols = taps.view(1, 1, 1, 5).expand(c, 1, 1, 5), taps.view(1, 1, 5, 1).expand(c, 1, 5, 1)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), rows, groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), cols, groups=c)


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
