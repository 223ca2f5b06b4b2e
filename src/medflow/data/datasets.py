"""Cases -> in-memory 2D slices at the training size, and leak-free train/validation splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medflow.data.io import Volume, read_image, read_label
from medflow.data.layout import Case, DatasetSpec
from medflow.data.patches import pad_to
from medflow.data.transforms import (
    Preprocessing,
    choose_slice_axis,
    ct_statistics,
    nonzero_box,
    normalise,
    resize_images,
    resize_labels,
    scheme_for,
    to_slices,
    with_context,
)
from medflow.errors import DataError

CT_SAMPLES_PER_CASE = 20000


@dataclass
class SliceSet:
    """Slices held in memory for training or validation.

    Attributes:
        images: ``(N, C, H, W)`` float32, normalised.
        masks: ``(N, H, W)`` uint8 label maps (rater 0's where there are several).
        case_ids: the case each slice came from, length N.
        raters: ``(N, R, H, W)`` uint8, every annotation of each slice, ``raters[:, 0]``
            equal to ``masks``; ``None`` where the cases have one annotation each.
        positions: ``(N,)`` float64, each slice's world coordinate in mm along the world
            axis nearest to the slice axis (:func:`slice_positions`); ``None`` for 2D images
            and for sets built without it.
    """

    images: torch.Tensor
    masks: torch.Tensor
    case_ids: list[str]
    raters: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Sequence[int] | np.ndarray) -> SliceSet:
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        raters = None if self.raters is None else self.raters[idx]
        positions = None if self.positions is None else self.positions[idx]
        ids = [self.case_ids[i] for i in idx]
        return SliceSet(self.images[idx], self.masks[idx], ids, raters, positions)

    def draw_masks(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The masks of slices ``idx`` ``(B,)``: ``masks[idx]`` with one annotation per
        slice, else for every row one rater drawn uniformly from ``generator`` (so training
        sees the raters' spread, as on LIDC's four readers).

        Returns:
            ``(B, H, W)`` uint8 label maps.
        """
        if self.raters is None:
            return self.masks[idx]
        pick = torch.randint(self.raters.shape[1], (len(idx),), generator=generator)
        return self.raters[idx, pick]


def plan_preprocessing(
    spec: DatasetSpec,
    cases: Sequence[Case],
    size: tuple[int, int],
    slice_axis: int | None = None,
    spacing: tuple[float, float] | None = None,
    context: int = 0,
) -> Preprocessing:
    """Decide normalisation, slice axis and size from the training cases.

    CT channels need the training set's foreground intensity statistics, so every case is
    read once; other schemes need only the first case (for the slice axis, and whether the
    data are 2D images or 3D volumes; :func:`load_slices` holds the other cases to that).
    """
    schemes = tuple(scheme_for(n) for n in spec.channel_names)
    first = read_image(cases[0].images)
    axis = (
        choose_slice_axis(first.geometry.spacing, first.geometry.shape)
        if slice_axis is None
        else slice_axis
    )
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
    if context and first.geometry.dims == 2:
        raise DataError(
            cases[0].images[0],
            f"is a 2D image: it has no neighbouring slices for context_slices={context}",
        )
    ct_stats = []
    ct_channels = [c for c, s in enumerate(schemes) if s == "ct"]
    if ct_channels:
        rng = np.random.default_rng(0)
        samples: dict[int, list[np.ndarray]] = {c: [] for c in ct_channels}
        for case in cases:
            img = read_image(case.images).array
            fg = read_label(case.label).array > 0
            for c in ct_channels:
                v = img[c][fg] if fg.any() else img[c].ravel()
                take = min(v.size, CT_SAMPLES_PER_CASE)
                samples[c].append(rng.choice(v, size=take, replace=False))
        ct_stats = [ct_statistics(samples[c]) for c in ct_channels]
    return Preprocessing(
        schemes=schemes,
        slice_axis=axis,
        size=tuple(size),
        ct_stats=tuple(tuple(s) for s in ct_stats),
        dims=first.geometry.dims,
        spacing=None if spacing is None else tuple(float(v) for v in spacing),
        context=context,
    )


def check_dims(image: Volume, prep: Preprocessing) -> None:
    """Refuse a 3D volume for a model trained on 2D images: slicing it would give an answer
    for data the model has never seen the like of."""
    if prep.dims == 2 and image.geometry.dims == 3:
        raise DataError(
            image.path,
            f"is a 3D volume of shape {image.geometry.shape} but the model was trained on "
            "2D images",
        )


def prepare_image(
    image: Volume, prep: Preprocessing
) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
    """Normalise, crop to nonzero and slice a volume: returns network-ready slices
    ``(N, C, H, W)`` and the crop box (in ``(X, Y, Z)``) they came from."""
    arr = image.array
    if arr.shape[0] != len(prep.schemes):
        raise DataError(
            image.path,
            f"has {arr.shape[0]} channel(s) but the model was trained on {len(prep.schemes)}",
        )
    check_dims(image, prep)
    if prep.slice_axis >= 3 or arr.shape[1 + prep.slice_axis] < 1:
        raise DataError(image.path, f"cannot slice along axis {prep.slice_axis}")
    box = nonzero_box(arr) if prep.crop_nonzero else tuple(slice(0, s) for s in arr.shape[1:])
    cropped = normalise(arr[(slice(None), *box)], prep)
    slices = torch.from_numpy(to_slices(cropped, prep.slice_axis))
    slices = resize_images(slices, prep.slice_shape(slices.shape[-2:], image.geometry.spacing))
    return with_context(slices, prep.context), box


def load_slices(cases: Sequence[Case], prep: Preprocessing, num_classes: int) -> SliceSet:
    """Read labelled cases and return all their slices at the training size; every
    annotation of cases with several (``Case.raters``) goes into ``SliceSet.raters``."""
    n_raters = _rater_count(cases)
    images, annotations, ids, positions = [], [], [], []
    for case in cases:
        img = read_image(case.images)
        if prep.dims == 2 and img.geometry.dims == 3:
            raise DataError(
                case.images[0],
                f"is a 3D volume of shape {img.geometry.shape}, but the first training case is "
                "a 2D image; a dataset holds 2D images or 3D volumes, not both",
            )
        x, box = prepare_image(img, prep)
        paths = case.raters if n_raters else (case.label,)
        # (N, R, H, W): each annotation sliced and resized exactly as a lone label map is
        y = [_label_slices(p, case, img, box, prep, num_classes) for p in paths]
        images.append(x)
        annotations.append(torch.stack(y, dim=1))
        ids.extend([case.case_id] * x.shape[0])
        positions.append(slice_positions(img, box, prep.slice_axis))
    # at a planned spacing cases differ in size: pad each to the largest (image 0, the
    # normalised mean; label 0, background), at the end of both axes
    shape = tuple(max(x.shape[-1 - i] for x in images) for i in (1, 0))
    images = [pad_to(x, shape) for x in images]
    stacked = torch.cat([pad_to(y, shape) for y in annotations])
    masks = stacked[:, 0].contiguous()
    where = torch.cat(positions) if prep.dims == 3 else None
    return SliceSet(torch.cat(images), masks, ids, stacked if n_raters else None, where)


def slice_positions(image: Volume, box: tuple[slice, slice, slice], axis: int) -> torch.Tensor:
    """World coordinates (mm) of the slices of ``image`` cropped to ``box`` along ``axis``.

    A slice's position is the world coordinate of the centre of its cropped plane along the
    world axis nearest to the voxel axis ``axis`` (for a RAS NIfTI sliced axially: z). Slabs
    cut from one volume with their affines shifted to their place (``mni152-tissue``) then
    share one frame, which a slice index within each file would not give.

    Returns:
        ``(N,)`` float64, N = the box's extent along ``axis``.
    """
    affine = np.asarray(image.geometry.affine, dtype=np.float64)
    world_axis = int(np.abs(affine[:3, axis]).argmax())
    centre = np.array([(s.start + s.stop - 1) / 2.0 for s in box])
    index = np.arange(box[axis].start, box[axis].stop, dtype=np.float64)
    voxels = np.repeat(centre[None], len(index), axis=0)
    voxels[:, axis] = index
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    return torch.from_numpy(world[:, world_axis])


def _rater_count(cases: Sequence[Case]) -> int:
    """The number of annotations every case has, 0 where none has raters.

    Raises:
        DataError: a case without a label, or cases with different numbers of raters.
    """
    for case in cases:
        if case.label is None:
            raise DataError(case.images[0], "has no label map")
    counts = {len(case.raters) for case in cases}
    if len(counts) > 1:
        first = cases[0]
        other = next(c for c in cases if len(c.raters) != len(first.raters))
        raise DataError(
            other.label,
            f"case '{other.case_id}' has {len(other.raters) or 1} annotation(s), but case "
            f"'{first.case_id}' has {len(first.raters) or 1}; slices of one set need the "
            "same raters",
        )
    return counts.pop() if counts else 0


def _label_slices(
    path: Path,
    case: Case,
    img: Volume,
    box: tuple[slice, slice, slice],
    prep: Preprocessing,
    num_classes: int,
) -> torch.Tensor:
    """One annotation of ``case`` (on ``img``'s grid), cropped to ``box``, sliced and
    resized to the training size: ``(N, H, W)`` uint8."""
    lab = read_label(path)
    if lab.geometry.shape != img.geometry.shape:
        raise DataError(
            path,
            f"label has spatial shape {lab.geometry.shape}, but image {case.images[0]} has "
            f"{img.geometry.shape}",
        )
    if int(lab.array.max()) >= num_classes:
        raise DataError(
            path,
            f"holds label value {int(lab.array.max())}, but dataset.json declares only "
            f"0..{num_classes - 1}",
        )
    y = torch.from_numpy(to_slices(lab.array[box][None], prep.slice_axis)[:, 0])
    shape = prep.slice_shape(y.shape[-2:], img.geometry.spacing)
    return resize_labels(y, shape, num_classes).to(torch.uint8)


def split_cases(
    cases: Sequence[Case], val_fraction: float, seed: int
) -> tuple[list[Case], list[Case]]:
    """Hold out whole cases for validation (at least one when there are two or more)."""
    cases = list(cases)
    if len(cases) < 2 or val_fraction <= 0:
        return cases, []
    n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    order = np.random.default_rng(seed).permutation(len(cases))
    val = sorted(order[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in val], [cases[i] for i in val]


def split_slab(n: int, val_fraction: float, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the slices of a single volume into a training part and one contiguous
    validation slab in the middle, dropping ``gap`` slices on each side of the slab so that
    no training slice neighbours a validation slice."""
    n_val = max(1, round(val_fraction * n))
    if n - n_val - 2 * gap < 1:
        raise ValueError(
            f"a volume of {n} slices is too thin to split off {n_val} slices with a gap of {gap}"
        )
    start = (n - n_val) // 2
    val = np.arange(start, start + n_val)
    train = np.array([i for i in range(n) if i < start - gap or i >= start + n_val + gap])
    return train, val
