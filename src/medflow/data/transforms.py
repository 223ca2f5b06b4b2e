"""Intensity normalisation, cropping and resizing, with the inverse mapping for outputs.

Normalisation follows nnU-Net, chosen per channel from its name in ``dataset.json``:

* ``"ct"`` (name contains "CT"): clip to the 0.5 and 99.5 percentiles of foreground
  intensities over the training set, then z-score with the training foreground mean and
  standard deviation (global statistics, because Hounsfield units mean the same everywhere);
* ``"zscore"`` (everything else: MRI, microscopy, ...): per image, subtract the mean and
  divide by the standard deviation of the image's nonzero voxels (all voxels when fewer
  than a tenth are nonzero), because MRI intensities have no absolute scale;
* ``"none"``, ``"rescale"`` (min-max to [0, 1] per image) and ``"rgb"`` (divide by 255) for
  nnU-Net's ``noNorm``, ``rescale_to_0_1`` and ``rgb_to_0_1``.

A volume is cropped to the bounding box of its nonzero voxels (nnU-Net's crop to nonzero),
and every slice of that box is resized to the training size. Predictions travel the same
way back: soft outputs are resized to the box, decoded there, and pasted into an all-
background volume of the input's shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

CT_PERCENTILES = (0.5, 99.5)


SCHEMES = {"ct": "ct", "nonorm": "none", "rescale_to_0_1": "rescale", "rgb_to_0_1": "rgb"}


def scheme_for(channel_name: str) -> str:
    """Normalisation scheme of a channel from its ``dataset.json`` name, with nnU-Net's
    reserved names (``CT``, ``noNorm``, ``rescale_to_0_1``, ``rgb_to_0_1``, any case);
    every other name gets ``"zscore"``."""
    return SCHEMES.get(channel_name.strip().lower(), "zscore")


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to map a raw volume to network input and a prediction back.

    Stored in every checkpoint, so prediction needs nothing else.

    Attributes:
        schemes: normalisation scheme per channel (see :func:`scheme_for`).
        ct_stats: per channel ``[lo, hi, mean, std]`` for ``"ct"`` channels, else ``[]``.
        slice_axis: spatial axis (0, 1, 2 of ``(X, Y, Z)``) along which 2D slices are taken.
        size: ``(H, W)`` of network input slices; with ``spacing``, the training patch.
        crop_nonzero: crop to the nonzero bounding box before resizing.
        dims: 2 when the model was trained on 2D images (a singleton spatial axis, as a PNG
            has), so that it refuses 3D volumes; 3 when it was trained on volumes.
        spacing: in-plane spacing in mm slices are resampled to (a plan's); None resizes
            every slice to ``size``.
        context: neighbouring slices on each side stacked as extra channels (2.5D): the
            network sees ``channels * (2 * context + 1)`` inputs, see :func:`with_context`.
    """

    schemes: tuple[str, ...]
    slice_axis: int
    size: tuple[int, int]
    ct_stats: tuple[tuple[float, ...], ...] = field(default=())
    crop_nonzero: bool = True
    dims: int = 3
    spacing: tuple[float, float] | None = None
    context: int = 0

    def input_channels(self) -> int:
        """Channels of a network input: every image channel at each of ``2 * context + 1``
        slices."""
        return len(self.schemes) * (2 * self.context + 1)

    def slice_shape(
        self, extent: tuple[int, int], spacing: tuple[float, float, float]
    ) -> tuple[int, int]:
        """In-plane size ``(H, W)`` at which the network sees a slice of ``extent`` pixels
        cut from a volume of voxel ``spacing`` ``(X, Y, Z)``: ``size``, or with a planned
        spacing the extent resampled to it."""
        if self.spacing is None:
            return tuple(self.size)
        from medflow.data.patches import planned_shape

        native = tuple(s for a, s in enumerate(spacing) if a != self.slice_axis)
        return planned_shape(tuple(extent), native, tuple(self.spacing))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            schemes=tuple(d["schemes"]),
            slice_axis=int(d["slice_axis"]),
            size=tuple(d["size"]),
            ct_stats=tuple(tuple(s) for s in d["ct_stats"]),
            crop_nonzero=bool(d["crop_nonzero"]),
            # checkpoints written before the field existed accepted any volume
            dims=int(d.get("dims", 3)),
            # and resized every slice to ``size``
            spacing=None if d.get("spacing") is None else tuple(float(v) for v in d["spacing"]),
            # and saw one slice at a time
            context=int(d.get("context", 0)),
        )


def choose_slice_axis(spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> int:
    """Slice across the coarsest axis (the acquisition direction of anisotropic scans); for
    isotropic data the last axis (axial in RAS-oriented NIfTI). Singleton axes win: a 2D
    image stored as ``(H, W, 1)`` is sliced along its third axis."""
    singleton = [a for a in range(3) if shape[a] == 1]
    if singleton:
        return singleton[-1]
    coarsest = max(spacing)
    return max(a for a in range(3) if np.isclose(spacing[a], coarsest, rtol=1e-3))


def ct_statistics(values: list[np.ndarray]) -> tuple[float, float, float, float]:
    """``[lo, hi, mean, std]`` of foreground intensities of one CT channel over cases."""
    v = np.concatenate([x.ravel() for x in values]).astype(np.float64)
    lo, hi = np.percentile(v, CT_PERCENTILES)
    v = np.clip(v, lo, hi)
    return float(lo), float(hi), float(v.mean()), float(max(v.std(), 1e-6))


def normalise(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Normalise ``(C, X, Y, Z)`` channel by channel; returns float32."""
    if image.shape[0] != len(prep.schemes):
        raise ValueError(f"image has {image.shape[0]} channels, model expects {len(prep.schemes)}")
    out = np.empty(image.shape, dtype=np.float32)
    ct_i = 0
    for c, scheme in enumerate(prep.schemes):
        x = image[c].astype(np.float32)
        if scheme == "ct":
            lo, hi, mean, std = prep.ct_stats[ct_i]
            ct_i += 1
            out[c] = (np.clip(x, lo, hi) - mean) / std
        elif scheme == "none":
            out[c] = x
        elif scheme == "rescale":
            out[c] = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
        elif scheme == "rgb":
            out[c] = x / 255.0
        else:
            nz = x[x != 0]
            ref = nz if nz.size > 0.1 * x.size else x
            out[c] = (x - ref.mean()) / max(float(ref.std()), 1e-6)
    return out


def nonzero_box(image: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of voxels nonzero in any channel of ``(C, X, Y, Z)``; the whole volume
    when everything is zero."""
    any_nz = np.any(image != 0, axis=0)
    if not any_nz.any():
        return tuple(slice(0, s) for s in any_nz.shape)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(any_nz.any(axis=other))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def to_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """``(C, X, Y, Z)`` -> ``(N, C, A, B)`` with N slices along spatial ``axis``."""
    return np.ascontiguousarray(np.moveaxis(volume, axis + 1, 0))


def from_slices(slices: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`to_slices` for ``(N, A, B)`` label slices -> ``(X, Y, Z)``."""
    return np.moveaxis(slices, 0, axis)


def with_context(slices: torch.Tensor, context: int) -> torch.Tensor:
    """2.5D input: each slice of ``(N, C, H, W)`` with its ``context`` neighbours on each
    side, ``(N, C * (2 * context + 1), H, W)``, ordered by offset (``-context`` first) and
    channel within an offset. Beyond the first and last slice the edge slice repeats (the
    volume's border is not zero anatomy)."""
    if context == 0:
        return slices
    n = slices.shape[0]
    offsets = torch.arange(-context, context + 1)
    index = (torch.arange(n)[:, None] + offsets[None]).clamp(0, n - 1)  # (N, 2k+1)
    stacked = slices[index]  # (N, 2k+1, C, H, W)
    return stacked.reshape(n, -1, *slices.shape[-2:])


def resize_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)``, antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def resize_labels(mask: torch.Tensor, size: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Resize label maps ``(N, H, W)`` by resizing their one-hot encoding and taking the
    argmax, which keeps thin structures that nearest-neighbour sampling would alias away."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    onehot = F.one_hot(mask.long(), num_classes).movedim(-1, 1).float()
    return resize_images(onehot, size).argmax(1).to(mask.dtype)


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    p_affine: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random augmentation of a batch, done batch-wise on the tensors' device.

    Per sample: mirror along each in-plane axis (p = 0.5 each, as nnU-Net); with probability
    ``p_affine`` a rotation in [-15, 15] degrees, scaling in [0.85, 1.15] and a shift of up to
    5 % of the size; intensity scale in [0.9, 1.1] and shift in [-0.1, 0.1] (data are
    z-scored); Gaussian noise with a standard deviation in [0, 0.05]. Masks follow the
    geometry through their one-hot encoding (bilinear, then argmax), so they stay label maps.

    One batched ``grid_sample`` replaces a per-sample transform pipeline: on a 2-core CPU the
    per-sample Python overhead would cost as much as the network step.
    """
    b = images.shape[0]
    dev = images.device

    def u(lo: float, hi: float, n: int = b) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * (hi - lo) + lo).to(dev)

    flip_h = u(0, 1) < 0.5
    flip_w = u(0, 1) < 0.5
    apply = (u(0, 1) < p_affine).float()
    angle = u(-15.0, 15.0) * torch.pi / 180.0 * apply
    scale = 1.0 + (u(0.85, 1.15) - 1.0) * apply
    shift = torch.stack([u(-0.05, 0.05), u(-0.05, 0.05)], dim=1) * apply[:, None]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    sx = torch.where(flip_w, -1.0, 1.0)
    sy = torch.where(flip_h, -1.0, 1.0)
    theta = torch.stack(
        [
            torch.stack([cos * sx, -sin * sy, shift[:, 0]], dim=1),
            torch.stack([sin * sx, cos * sy, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    onehot = F.one_hot(masks.long(), num_classes).movedim(-1, 1).float()
    # out-of-field voxels sample all-zero one-hot vectors, whose argmax is background
    masks = (
        F.grid_sample(onehot, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        .argmax(1)
        .to(masks.dtype)
    )

    gain = u(0.9, 1.1)[:, None, None, None]
    offset = u(-0.1, 0.1)[:, None, None, None]
    sigma = u(0.0, 0.05)[:, None, None, None]
    noise = torch.randn(images.shape, generator=generator).to(dev)
    return images * gain + offset + sigma * noise, masks
