"""Training patches cut from slices resampled to the planned spacing.

nnU-Net trains on patches, not on whole images squeezed to one size: every slice is first
resampled to the dataset's planned in-plane spacing (so a millimetre is the same number of
pixels in every case and the aspect ratio is kept), and each batch is a set of patches of a
fixed shape cut from those slices. Because foreground is often a small part of a slice, a
fixed share of every batch (the last third in nnU-Net) is centred on a foreground voxel;
with ``class_balanced`` the class of that voxel is drawn uniformly over the classes present,
so that a rare class is trained on as often as a common one.

Shapes: images ``(N, C, H, W)``, label maps ``(N, H, W)`` (or ``(N, R, H, W)`` with R raters),
patches ``(B, C, h, w)`` and ``(B, h, w)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from medflow.data.transforms import resize_images, resize_labels


def _shape2(shape: tuple[int, int], name: str) -> tuple[int, int]:
    """``shape`` as a pair of positive ints, else ValueError naming it."""
    s = tuple(shape)
    if len(s) != 2 or any(int(v) != v or v < 1 for v in s):
        raise ValueError(f"{name} must be two positive integers, got {shape!r}")
    return int(s[0]), int(s[1])


def planned_shape(
    extent: tuple[int, int], native: tuple[float, float], target: tuple[float, float]
) -> tuple[int, int]:
    """In-plane pixel count of a slice after resampling it to the planned spacing.

    Each axis keeps its physical length: ``max(1, round(extent_i * native_i / target_i))``,
    with Python's (and numpy's, as nnU-Net's ``compute_new_shape``) round half to even.

    Args:
        extent: ``(H, W)`` pixels of the slice.
        native: ``(H, W)`` spacing of the slice in mm.
        target: ``(H, W)`` planned spacing in mm.

    Returns:
        ``(H', W')`` pixels at the planned spacing.

    Raises:
        ValueError: a non-positive extent or spacing.
    """
    extent = _shape2(extent, "extent")
    for name, spacing in (("native", native), ("target", target)):
        if len(tuple(spacing)) != 2 or any(not s > 0 for s in spacing):
            raise ValueError(f"{name} spacing must be two positive numbers (mm), got {spacing!r}")
    return tuple(max(1, round(e * n / t)) for e, n, t in zip(extent, native, target))


def resample_slices(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Images ``(N, C, H, W)`` -> ``(N, C, *shape)``, bilinear, antialiased when shrinking."""
    shape = _shape2(shape, "shape")
    if x.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    return resize_images(x, shape)


def resample_labels(masks: torch.Tensor, shape: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Label maps ``(N, H, W)`` or ``(N, R, H, W)`` -> the same leading dims by ``shape``.

    Resamples the one-hot encoding bilinearly and takes the argmax (see
    :func:`medflow.data.transforms.resize_labels`), so thin structures survive; the dtype is
    kept.
    """
    shape = _shape2(shape, "shape")
    if masks.dim() not in (3, 4):
        raise ValueError(f"label maps must be (N, H, W) or (N, R, H, W), got {tuple(masks.shape)}")
    lead = masks.shape[:-2]
    # resize_labels takes (N, H, W): raters ride along as extra rows
    flat = resize_labels(masks.reshape(-1, *masks.shape[-2:]), shape, num_classes)
    return flat.reshape(*lead, *shape)


def pad_to(x: torch.Tensor, shape: tuple[int, int], value: float = 0) -> torch.Tensor:
    """Pad the last two axes at their end (bottom, right) to at least ``shape``; never crops.

    Padding at the end keeps pixel ``(i, j)`` at ``(i, j)``, so crop offsets computed on the
    padded slice index the original one too.

    Args:
        x: ``(..., H, W)``, any leading dims and dtype (images or label maps).
        shape: ``(h, w)`` minimum size.
        value: fill value (0: background for label maps).

    Returns:
        ``(..., max(H, h), max(W, w))``; ``x`` itself when nothing is padded.
    """
    h, w = _shape2(shape, "shape")
    if x.dim() < 2:
        raise ValueError(f"pad_to needs at least two axes, got shape {tuple(x.shape)}")
    dh, dw = max(0, h - x.shape[-2]), max(0, w - x.shape[-1])
    if dh == 0 and dw == 0:
        return x
    return F.pad(x, (0, dw, 0, dh), mode="constant", value=value)


class Patches(NamedTuple):
    """A batch of patches and where they came from.

    Attributes:
        images: ``(B, C, h, w)``.
        masks: ``(B, h, w)``, the input's dtype.
        offsets: ``(B, 2)`` long, top-left ``(row, col)`` of each patch in the (padded) slice.
        centred: ``(B,)`` bool, True where the patch was centred on a foreground voxel
            (False for random rows and for foreground rows of slices with no foreground).
    """

    images: torch.Tensor
    masks: torch.Tensor
    offsets: torch.Tensor
    centred: torch.Tensor


@dataclass(frozen=True)
class PatchSampler:
    """Cut one patch per slice, with nnU-Net's foreground oversampling.

    The last ``round(foreground_fraction * B)`` rows of a batch (Python's round, half to
    even) are centred on a foreground voxel; the others are uniformly random crops. The count
    is fixed rather than drawn per row, so the foreground rate is exact in every batch, as in
    nnU-Net's oversampling of the last third.

    Attributes:
        patch: ``(h, w)`` of every patch.
        num_classes: classes including background 0; labels must lie in ``[0, num_classes)``.
        foreground_fraction: share of each batch centred on foreground, in [0, 1].
        class_balanced: a foreground row picks its class uniformly among the foreground
            classes present in the slice (a 9-voxel class as often as a 10 000-voxel one);
            otherwise in proportion to voxel count (a uniformly random foreground voxel).
    """

    patch: tuple[int, int]
    num_classes: int
    foreground_fraction: float = 1 / 3
    class_balanced: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch", _shape2(self.patch, "patch"))
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(
                f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}"
            )
        if int(self.num_classes) != self.num_classes or self.num_classes < 2:
            raise ValueError(
                f"num_classes must be an integer >= 2 (background and one class), "
                f"got {self.num_classes}"
            )

    def foreground_rows(self, batch: int) -> int:
        """How many rows (the last ones) of a batch of ``batch`` are centred on foreground."""
        return round(self.foreground_fraction * batch)

    def sample(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One patch per slice.

        Args:
            images: ``(B, C, H, W)``.
            masks: ``(B, H, W)`` integer label maps.
            generator: CPU generator, the only source of randomness.

        Returns:
            ``(B, C, h, w)`` images and ``(B, h, w)`` masks on the inputs' device.
        """
        p = self.sample_with_offsets(images, masks, generator)
        return p.images, p.masks

    def sample_with_offsets(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
    ) -> Patches:
        """As :meth:`sample`, also returning each patch's offset and whether it was centred
        on foreground (both on the inputs' device)."""
        self._check(images, masks, generator)
        h, w = self.patch
        # slices smaller than the patch grow at the bottom/right with background
        images, masks = pad_to(images, self.patch), pad_to(masks, self.patch)
        b, _, hh, ww = images.shape
        dev = images.device
        # a fixed number of draws per row whatever the branch, so one row's data never shifts
        # another row's randomness
        u = torch.rand(b, 4, generator=generator, dtype=torch.float64)

        span = torch.tensor([hh - h + 1, ww - w + 1], dtype=torch.float64)
        offsets = (u[:, :2] * span).long().minimum(span.long() - 1)
        centred = torch.zeros(b, dtype=torch.bool)
        first = b - self.foreground_rows(b)
        if first < b:
            voxel, found = self._foreground_voxels(masks[first:], u[first:, 2], u[first:, 3])
            found = found.cpu()
            centre = torch.stack([voxel // ww, voxel % ww], dim=1).cpu()
            # centre the patch on the voxel, clamped so that it lies inside the slice
            lo = centre - torch.tensor([h // 2, w // 2])
            fg_off = lo.maximum(torch.zeros(2, dtype=torch.long)).minimum(span.long() - 1)
            offsets[first:] = torch.where(found[:, None], fg_off, offsets[first:])
            centred[first:] = found

        offsets = offsets.to(dev)
        rows = offsets[:, :1] + torch.arange(h, device=dev)  # (B, h)
        cols = offsets[:, 1:] + torch.arange(w, device=dev)  # (B, w)
        bi = torch.arange(b, device=dev)[:, None, None]
        r, c = rows[:, :, None], cols[:, None, :]
        # advanced indices around a slice put their dims first: (B, h, w, C)
        out_images = images[bi, :, r, c].permute(0, 3, 1, 2).contiguous()
        out_masks = masks[bi, r, c]
        return Patches(out_images, out_masks, offsets, centred.to(dev))

    def _foreground_voxels(
        self, masks: torch.Tensor, u_class: torch.Tensor, u_voxel: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A foreground voxel of each slice, as a flat index into ``H * W``.

        Args:
            masks: ``(F, H, W)`` label maps.
            u_class, u_voxel: ``(F,)`` float64 uniforms in [0, 1) (CPU).

        Returns:
            ``(F,)`` long flat indices (0 where there is no foreground) and ``(F,)`` bool,
            True where the slice has foreground.
        """
        n, k = masks.shape[0], self.num_classes
        flat = masks.reshape(n, -1).long()
        dev = flat.device
        keys = flat + k * torch.arange(n, device=dev)[:, None]
        counts = torch.bincount(keys.reshape(-1), minlength=n * k).reshape(n, k)[:, 1:].cpu()
        weights = (counts > 0).long() if self.class_balanced else counts
        total = weights.sum(1)
        found = total > 0
        # integer inverse-CDF draws: exact, and a class of weight 0 can never be hit
        cum = weights.cumsum(1)
        pick = (u_class * total).long().minimum((total - 1).clamp(min=0))
        cls = torch.searchsorted(cum, pick[:, None], right=True)[:, 0].clamp(max=k - 2) + 1
        n_cls = counts.gather(1, (cls - 1)[:, None])[:, 0]
        kth = (u_voxel * n_cls).long().minimum((n_cls - 1).clamp(min=0))
        # the kth voxel (raster order) of the chosen class: first index where the running
        # count of that class exceeds kth
        running = (flat == cls.to(dev)[:, None]).cumsum(1)
        voxel = torch.searchsorted(running, kth.to(dev)[:, None], right=True)[:, 0]
        voxel = torch.where(found.to(dev), voxel, torch.zeros_like(voxel))
        return voxel, found

    def _check(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        if masks.dim() != 3:
            raise ValueError(f"masks must be (B, H, W), got shape {tuple(masks.shape)}")
        if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(
                f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not match"
            )
        if images.shape[0] == 0:
            raise ValueError("cannot sample patches from an empty batch")
        if masks.dtype.is_floating_point or masks.dtype == torch.bool:
            raise ValueError(f"masks must be integer label maps, got dtype {masks.dtype}")
        lo, hi = int(masks.min()), int(masks.max())
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(
                f"mask labels must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]"
            )
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
