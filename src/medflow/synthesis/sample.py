"""``medflow synth sample``: N synthetic image-mask pairs written as an nnU-Net raw dataset.

Masks come from the mask flow, images from the (aligned or stage-1) image flow for those
masks, written in the source's format (NIfTI, PNG or TIFF). For a 2D source each pair is one
case; for a source of volumes, pairs are stacked along the source's slice axis into small
volumes (:func:`case_groups`), because a dataset holds 2D images or volumes, not both, and
``medflow train`` cuts them back into the same slices. With ``include_source`` the source's
labelled training cases are copied in as well, so the folder is "real + synthetic", ready
for ``medflow train``.

Real masks. With ``masks`` the images are generated for given label maps instead, e.g. the
source's own (:func:`real_pairs`: drawn without replacement while they last). A model
aligned to translate (``AlignConfig.start_time`` t0 > 0, recorded in its ``alignment``)
starts each image from its real image partly noised to t0, so it is sampled only with the
real ``images`` of those masks beside them.

Intensities. Generated images are normalised intensities. Where the source has an exact
zero background (skull-stripped MRI), the z-score of ``medflow train`` runs over nonzero
voxels only; a sample is therefore written shifted so that the source's background level is
0 and values within ``BACKGROUND_TOLERANCE`` of it become exactly 0, so that reading it back
normalises over the same region as a source scan (see :func:`to_raw`). PNG holds 8-bit
integers: samples are scaled to 0..255 per image, which every per-image normalisation
(z-score, rescale) undoes.

The folder appears whole or not at all (written beside it, then renamed), and an existing
dataset is replaced only with ``force``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medflow.data.datasets import load_slices
from medflow.data.io import (
    NIFTI_ENDINGS,
    PNG_ENDINGS,
    Geometry,
    atomic_write,
    build_folder,
    write_volume,
)
from medflow.data.layout import load_dataset
from medflow.data.naming import SYNTHETIC_PREFIX
from medflow.engine.runtime import progress, resolve_device
from medflow.errors import MedflowError, OutputExistsError
from medflow.synthesis.model import SynthModel
from medflow.synthesis.preview import save_grid
from medflow.synthesis.train import common_background
from medflow.synthesis.view import BACKGROUND_TOLERANCE, keep_outline, zero_level

PREFIX = SYNTHETIC_PREFIX  # case ids synth_00000, ...: what TrainConfig.synthetic_fraction finds


def start_time(model: SynthModel) -> float:
    """Where the model's sampler starts: the t0 its alignment translated from, 0 (noise) for
    a stage-1 model and for alignments recorded before translation existed."""
    return float((model.alignment or {}).get("start_time", 0.0))


def draw_order(count: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` indices into ``count`` items, random permutations one after another: every item
    is drawn once before any is drawn twice."""
    rounds = -(-n // count)
    return torch.cat([torch.randperm(count, generator=generator) for _ in range(rounds)])[:n]


def source_slices(source: str | Path, model: SynthModel):
    """The labelled training slices of ``source`` (masks ``(N, H, W)``, images
    ``(N, C, H, W)``) prepared with the model's preprocessing, as stage 1 trained on them
    (each case's background at the model's level, :func:`.train.common_background`).

    Raises:
        MedflowError: a dataset without labelled cases, or with other labels or channels
            than the model's.
    """
    spec = load_dataset(source)
    problem = None
    if not spec.training:
        problem = "has no labelled training cases"
    elif dict(spec.labels) != dict(model.labels):
        problem = f"has labels {dict(spec.labels)}, the synthesis model {dict(model.labels)}"
    elif len(spec.channel_names) != len(model.channel_names):
        problem = f"has {len(spec.channel_names)} channel(s), the synthesis model "
        problem += str(len(model.channel_names))
    if problem:
        raise MedflowError(f"{source}: {problem}; give the model's labelled source dataset")
    return common_background(
        load_slices(spec.training, model.prep, spec.num_classes), model.background_level
    )


def real_pairs(
    source: str | Path, model: SynthModel, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real (mask ``(n, H, W)``, image ``(n, C, H, W)``) training pairs of ``source``
    at the model's size, drawn with ``seed`` by :func:`draw_order` (several draws of a mask
    when ``n`` exceeds the slices)."""
    if n < 1:
        raise MedflowError(f"--n must be >= 1, got {n}")
    slices = source_slices(source, model)
    order = draw_order(len(slices), n, torch.Generator().manual_seed(seed))
    return slices.masks[order], slices.images[order]


def to_raw(image: np.ndarray, background_level: float | None, ending: str) -> np.ndarray:
    """A generated normalised image ``(H, W)`` as intensities to store in ``ending``."""
    if ending in PNG_ENDINGS:
        lo, hi = float(image.min()), float(image.max())
        return np.round((image - lo) / max(hi - lo, 1e-6) * 255.0).astype(np.uint8)
    if background_level is None:
        return image.astype(np.float32)
    raw = image - background_level
    raw[raw < BACKGROUND_TOLERANCE] = 0.0
    return raw.astype(np.float32)


def _geometry(size: tuple[int, int], depth: int, axis: int, ending: str) -> Geometry:
    """A grid of ``depth`` slices of ``size`` stacked along ``axis``; the stacking axis gets
    the coarsest spacing, so :func:`medflow.data.transforms.choose_slice_axis` slices along
    it whether or not ``depth`` is 1."""
    shape = [size[0], size[1]]
    shape.insert(axis, depth)
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = 2.0 if depth > 1 else 1.0
    return Geometry(
        shape=tuple(shape), spacing=tuple(spacing), affine=np.diag([*spacing, 1.0]), ending=ending
    )


def case_groups(n: int, volumes: bool, per_case: int) -> list[np.ndarray]:
    """Indices of the samples written into each case: one per case for 2D sources; for a
    source of volumes, stacks of ``per_case`` to ``2 * per_case - 1`` slices (a dataset holds
    2D images or volumes, not both, so pairs that join a source of volumes must be volumes;
    the slices of a stack are independent samples, not neighbours)."""
    if not volumes:
        return [np.array([i]) for i in range(n)]
    if n < 2:
        raise MedflowError(f"--n must be >= 2 for a source of volumes (stacks), got {n}")
    return np.array_split(np.arange(n), max(1, n // max(2, per_case)))


def _copy_source(source: Path, out: Path, ending: str, channels: int) -> int:
    spec = load_dataset(source)
    if spec.file_ending != ending:
        raise MedflowError(
            f"{source}: its files are {spec.file_ending} but the synthesis model was trained on "
            f"{ending} data; include a source of the same kind"
        )
    if len(spec.channel_names) != channels:
        raise MedflowError(
            f"{source}: has {len(spec.channel_names)} channel(s), the synthesis model {channels}"
        )
    for case in spec.training:
        if case.case_id.startswith(PREFIX + "_"):
            raise MedflowError(f"{source}: case {case.case_id} clashes with synthetic case names")
        for path in case.images:
            shutil.copy2(path, out / "imagesTr" / path.name)
        shutil.copy2(case.label, out / "labelsTr" / case.label.name)
    return len(spec.training)


@torch.no_grad()
def sample_dataset(
    checkpoint: str | Path,
    out: str | Path,
    n: int,
    *,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 16,
    per_case: int = 8,
    include_source: str | Path | None = None,
    masks: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
) -> dict:
    """Write ``n`` synthetic pairs (and, optionally, the source's training cases) to ``out``
    as an nnU-Net raw dataset; returns its ``dataset.json``. With ``masks`` ``(n, H, W)``
    (label maps at the model's size), the images are generated for those masks instead of
    for mask-flow samples. ``images`` ``(n, C, H, W)``, the real images of those masks
    prepared as stage 1 trained on them, are what a translating model (:func:`start_time`
    > 0) starts from; a model that starts from noise does not use them."""
    if n < 1 or batch_size < 1:
        raise MedflowError(f"--n and --batch-size must be >= 1, got {n} and {batch_size}")
    if masks is not None and len(masks) != n:
        raise MedflowError(f"{len(masks)} masks given for n={n} pairs")
    if images is not None and (masks is None or len(images) != n):
        raise MedflowError(f"images are given with their masks, one per pair (n={n})")
    if steps is not None and steps < 1:
        raise MedflowError(f"--steps must be >= 1, got {steps}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExistsError(out)
    model = SynthModel.load(checkpoint, resolve_device(device))
    steps = steps or model.sample_steps
    start = start_time(model)
    if start > 0 and images is None:
        raise MedflowError(
            f"{checkpoint}: translates real images from t0={start:g}; sample it for real "
            "masks with their images (--real-masks DATA)"
        )
    shape = (len(model.channel_names), *model.size)
    if images is not None and tuple(images.shape[1:]) != shape:
        raise MedflowError(f"images of shape {tuple(images.shape[1:])} given, the model's {shape}")

    return build_folder(
        out,
        lambda tmp: _write(
            tmp,
            model,
            _Draw(n, seed, steps, batch_size, masks, images if start > 0 else None, start),
            per_case,
            include_source,
            checkpoint,
            quiet,
        ),
    )


@dataclass(frozen=True)
class _Draw:
    """What to generate: ``n`` pairs from ``seed`` with ``steps`` image-flow steps in batches
    of ``batch_size``, for mask-flow masks or for the given ``masks``; from noise, or (for
    ``start > 0``) from the given ``images`` partly noised to ``start``."""

    n: int
    seed: int
    steps: int
    batch_size: int
    masks: torch.Tensor | None = None
    images: torch.Tensor | None = None
    start: float = 0.0


def _images(model: SynthModel, masks, gen: torch.Generator, draw: _Draw, real):
    """The image flow's images for ``masks``; for a model that keeps stage 1's outline
    (``outline_flow``), stage 1's image from the same noise says which pixels stay
    background (:func:`medflow.synthesis.view.keep_outline`)."""
    state = gen.get_state()
    images = model.image_flow.sample(masks, gen, draw.steps, start=draw.start, images=real)
    if model.outline_flow is None:
        return images
    twin = torch.Generator().set_state(state)  # the same noise for stage 1
    ref = model.outline_flow.sample(masks, twin, draw.steps, start=draw.start, images=real)
    return keep_outline(images, ref, zero_level(model.background_level, model.file_ending))


def _generate(model: SynthModel, draw: _Draw, mask_steps: int, quiet: bool):
    gen = torch.Generator().manual_seed(draw.seed)
    images, masks = [], []
    bar = progress(total=draw.n, quiet=quiet, desc="synth sample", unit="pair")
    for first in range(0, draw.n, draw.batch_size):
        b = min(draw.batch_size, draw.n - first)
        if draw.masks is None:
            masks.append(model.mask_flow.sample(b, model.size, gen, mask_steps))
        else:
            masks.append(draw.masks[first : first + b].to(torch.uint8))
        real = None if draw.images is None else draw.images[first : first + b]
        images.append(_images(model, masks[-1], gen, draw, real))
        bar.update(b)
    bar.close()
    return torch.cat(images), torch.cat(masks)


def _write(
    tmp: Path,
    model: SynthModel,
    draw: _Draw,
    per_case: int,
    include_source,
    checkpoint,
    quiet: bool,
) -> dict:
    """Fill the (temporary) dataset folder ``tmp``; returns its ``dataset.json``."""
    ending = model.file_ending if model.file_ending in NIFTI_ENDINGS + PNG_ENDINGS else ".tif"
    (tmp / "imagesTr").mkdir()
    (tmp / "labelsTr").mkdir()
    n_source = (
        _copy_source(Path(include_source), tmp, ending, len(model.channel_names))
        if include_source is not None
        else 0
    )
    # alignment changes the image flow (and its steps) only: masks keep stage 1's sampler, so
    # aligned and unaligned sets of one seed share their masks
    mask_steps = int(model.config["sample_steps"])
    images, masks = _generate(model, draw, mask_steps, quiet)
    n = draw.n
    axis = model.prep.slice_axis
    groups = case_groups(n, model.prep.dims == 3, per_case)
    for g, index in enumerate(groups):
        case = f"{PREFIX}_{g:05d}"
        geometry = _geometry(model.size, len(index), axis, ending)
        for c in range(images.shape[1]):
            raw = np.stack(
                [to_raw(images[i, c].numpy(), model.background_level, ending) for i in index],
                axis=axis,
            )
            write_volume(tmp / "imagesTr" / f"{case}_{c:04d}{ending}", raw, geometry)
        label = np.stack([masks[i].numpy().astype(np.uint8) for i in index], axis=axis)
        write_volume(tmp / "labelsTr" / f"{case}{ending}", label, geometry)
    meta = {
        "channel_names": {str(i): name for i, name in enumerate(model.channel_names)},
        "labels": dict(model.labels),
        "numTraining": len(groups) + n_source,
        "file_ending": ending,
        "description": f"{n} synthetic image-mask pairs from medflow synth"
        + (f" and {n_source} real cases of {include_source}" if n_source else ""),
        "medflow": {
            "synthetic_pairs": n,
            "synthetic_cases": len(groups),
            "source_cases": n_source,
            "source": str(include_source) if include_source is not None else None,
            "checkpoint": str(Path(checkpoint).resolve()),
            "aligned": model.alignment is not None,
            "alignment": model.alignment,
            "seed": draw.seed,
            "steps": draw.steps,
            "mask_steps": mask_steps if draw.masks is None else None,
            "masks": "mask flow" if draw.masks is None else "given",
            "start_time": draw.start,
        },
    }
    atomic_write(tmp / "dataset.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    save_grid(
        tmp / "preview.png",
        [("synthetic", images[:16])],
        masks=masks[:16],
    )
    return meta
