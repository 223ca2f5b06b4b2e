"""Stage 1 of AlignFlow (``medflow synth train``): a mask flow and a mask-conditioned image
flow, trained together on the labelled source dataset.

The source is read exactly as ``medflow train`` reads it (same normalisation, slice axis,
crop and size), so generated images live where the segmenter's inputs live. Every step
trains both flows on the same batch of slices with one optimiser, or, with
``separate_optimisers``, each flow with its own optimiser, batches and noise (the mask flow
possibly for more steps); the exponential moving averages of their weights are saved. The
run folder holds ``synth.pt``, ``config.json``, ``log.csv`` and ``preview.png`` (generated
pairs beside real ones).

One thing differs from the segmenter's reading: each case is z-scored over its own nonzero
voxels, so its zero background lands at a level of its own (on the builtin MNI slabs from
0.7 below to 1.6 above the median). The image flow would learn that spread and draw some
heads inside a dim frame, which ``synth sample`` cannot tell from tissue (it writes only
pixels at the common level as background) and the reader then normalises as part of the
head. Stage 1 therefore trains on each case shifted so its background sits at the common
level (:func:`common_background`); the reader's z-score erases such a shift of the tissue.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from medflow import __version__
from medflow.data.datasets import SliceSet, load_slices, plan_preprocessing
from medflow.data.io import atomic_write, read_image
from medflow.data.layout import DatasetSpec, load_dataset
from medflow.data.transforms import Preprocessing
from medflow.engine.logs import write_log
from medflow.engine.runtime import progress
from medflow.engine.schedule import ema_update, lr_factor
from medflow.errors import MedflowError
from medflow.synthesis.config import SynthConfig
from medflow.synthesis.image_flow import ImageFlow
from medflow.synthesis.mask_flow import MaskFlow, SlicePositions
from medflow.synthesis.mask_post import MaskCleanup
from medflow.synthesis.model import SynthModel, start_run
from medflow.synthesis.preview import save_grid

CHECKPOINT = "synth.pt"
RUN_FILES = (CHECKPOINT, "config.json", "log.csv", "preview.png", "preview_masks.png")
# with separate optimisers the mask flow draws its batches and noise from a generator seeded
# ``seed + MASK_STREAM``, independent of the image flow's
MASK_STREAM = 1_000_003
# a case's zero background: the pixels at its minimum (bilinear resizing, a convex
# combination, cannot go below it), when they are at least this share of its pixels
_AT_ZERO = 1e-4
_MIN_BACKGROUND = 0.1


def load_source(
    data: str | Path, size: int, slice_axis: int | None = None
) -> tuple[DatasetSpec, SliceSet, Preprocessing]:
    """The source's training slices, prepared as ``medflow train`` prepares them."""
    spec = load_dataset(data)
    if not spec.training:
        raise MedflowError(f"{spec.root}: the dataset has no labelled training cases")
    prep = plan_preprocessing(spec, spec.training, (size, size), slice_axis)
    return spec, load_slices(spec.training, prep, spec.num_classes), prep


def background_level(images: torch.Tensor, spec: DatasetSpec) -> float | None:
    """Normalised value of the source's zero background, when it has one.

    Skull-stripped MRI has exact zeros outside the head, and the z-score normalisation then
    runs over the nonzero voxels only; samples are written with their background set back
    to zero so the same normalisation reads them the same way (:mod:`.sample`). On
    normalised slices the zero background is each slice's minimum; the median over slices
    is robust to slices without background.
    """
    raw = read_image(spec.training[0].images).array
    if (raw == 0).mean() < 0.1:
        return None
    return float(images.amin(dim=(1, 2, 3)).median())


def common_background(slices: SliceSet, level: float | None) -> SliceSet:
    """``slices`` with each case's images shifted, per channel, so that its zero background
    (its minimum, where at least a tenth of its pixels sit there) lies at ``level``; cases
    and channels without such a background, and every case when ``level`` is None, are
    left as they are (module docstring)."""
    if level is None:
        return slices
    images = slices.images.clone()
    ids = np.asarray(slices.case_ids)
    for case in dict.fromkeys(slices.case_ids):
        rows = torch.from_numpy(np.flatnonzero(ids == case))
        x = images[rows]
        zero = x.amin(dim=(0, 2, 3), keepdim=True)
        share = (x - zero <= _AT_ZERO).to(x.dtype).mean(dim=(0, 2, 3), keepdim=True)
        images[rows] = x + torch.where(share >= _MIN_BACKGROUND, level - zero, 0.0)
    return replace(slices, images=images)


def train_synth(
    data: str | Path,
    out: str | Path,
    cfg: SynthConfig,
    *,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Train both flows on the dataset at ``data``; returns the checkpoint's path."""
    out = Path(out)
    dev, gen = start_run(
        out, RUN_FILES, force=force, device=device, threads=cfg.threads, seed=cfg.seed
    )
    spec, slices, prep = load_source(data, cfg.size, cfg.slice_axis)
    level = background_level(slices.images, spec)
    slices = common_background(slices, level)
    flows = train_flows(
        slices, spec.num_classes, len(spec.channel_names), cfg, dev, gen, quiet=quiet
    )
    rows = flows.rows
    model = SynthModel(
        mask_flow=flows.mask_flow,
        image_flow=flows.image_flow,
        prep=prep,
        labels=dict(spec.labels),
        channel_names=list(spec.channel_names),
        file_ending=spec.file_ending,
        background_level=level,
        sample_steps=cfg.sample_steps,
        config=cfg.to_dict(),
    )
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "config": cfg.to_dict(),
        "data": str(Path(data).resolve()),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "train_slices": len(slices),
        "preprocessing": prep.to_dict(),
        "seconds": rows[-1]["seconds"],
        "medflow_version": __version__,
    }
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    write_log(out / "log.csv", list(rows[0]), rows)
    _preview(model, slices, out / "preview.png", cfg.seed)
    return model.save(out / CHECKPOINT)


@dataclass
class TrainedFlows:
    """What :func:`train_flows` returns: the flows' EMA networks (in eval mode) and the log.

    Attributes:
        mask_flow: the trained mask flow, with its encoding, positions and clean-up.
        image_flow: the trained image flow; None for a ``mask_only`` run.
        rows: one log row per step.
    """

    mask_flow: MaskFlow
    image_flow: ImageFlow | None
    rows: list[dict]


class _Optimiser:
    """AdamW with warm-up + cosine decay over ``total`` steps, the gradient clipped to norm 1
    over all of ``nets``, and an EMA copy of each network."""

    def __init__(self, nets: list[torch.nn.Module], lr: float, total: int, cfg: SynthConfig):
        self.nets = nets
        self.emas = [copy.deepcopy(n).requires_grad_(False) for n in nets]
        self.params = [p for n in nets for p in n.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup_steps, total)
        )
        self.decay = cfg.ema_decay

    def step(self, loss: torch.Tensor, step: int) -> float:
        """One update from ``loss``; returns the learning rate after it (for the log)."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        for ema, net in zip(self.emas, self.nets):
            ema_update(ema, net, self.decay, step)
        return self.sched.get_last_lr()[0]


def _batch(
    slices: SliceSet, positions: torch.Tensor | None, cfg: SynthConfig, gen, dev
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A random batch of ``(B, C, H, W)`` images, ``(B, H, W)`` masks and ``(B,)`` relative
    positions (or None), mirrored at random with ``cfg.hflip``."""
    idx = torch.randint(len(slices), (cfg.batch_size,), generator=gen)
    images, masks = slices.images[idx], slices.masks[idx]
    if cfg.hflip:
        # mirroring in-plane moves no slice along the slice axis: positions stay
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-2), images)
        masks = torch.where(flip[:, None, None], masks.flip(-2), masks)
    pos = None if positions is None else positions[idx]
    return images.to(dev), masks.to(dev), pos


def _check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise MedflowError(f"synth train: loss became {loss.item()} at step {step + 1}")


def _build_mask_flow(slices: SliceSet, num_classes: int, cfg: SynthConfig) -> MaskFlow:
    """An untrained mask flow with ``cfg``'s encoding, positions and clean-up."""
    positions = None
    if cfg.position_condition:
        if slices.positions is None:
            raise MedflowError(
                "synth train: position_condition needs slices of volumes; the source holds "
                "2D images, which have no position along a slice axis"
            )
        try:
            positions = SlicePositions.from_mm(slices.positions)
        except ValueError as exc:
            raise MedflowError(f"synth train: position_condition: {exc}") from exc
    cleanup = (
        MaskCleanup(cfg.mask_min_component, cfg.mask_max_hole) if cfg.mask_postprocess else None
    )
    return MaskFlow.build(
        num_classes, cfg.mask_channels, cfg.mask_encoding, cfg.mask_sdf_width, positions, cleanup
    )


def train_flows(
    slices: SliceSet,
    num_classes: int,
    channels: int,
    cfg: SynthConfig,
    dev: torch.device,
    gen: torch.Generator,
    *,
    quiet: bool = True,
    mask_only: bool = False,
) -> TrainedFlows:
    """Train the mask flow and (unless ``mask_only``) the image flow on ``slices``.

    With ``cfg.separate_optimisers`` each flow has its own optimiser and its own batches
    and noise: the mask flow draws from a generator seeded ``cfg.seed + MASK_STREAM``, the
    image flow from ``gen``, so the mask flow trained with ``mask_only`` is the one a full
    run trains. Without, both share one optimiser, one clip and one batch per step, as
    stage 1 always did (``mask_only`` is refused: the image loss is part of the mask flow's
    update there). Networks are built in the same order either way (mask flow first), so
    one seed gives both the same initial weights.
    """
    if mask_only and not cfg.separate_optimisers:
        raise ValueError("mask_only needs separate_optimisers: a joint step uses both losses")
    mask_flow = _build_mask_flow(slices, num_classes, cfg)
    mask_flow.net.to(dev)
    image_flow = None if mask_only else ImageFlow.build(channels, num_classes, cfg.image_channels)
    if image_flow is not None:
        image_flow.net.to(dev)
    positions = None
    if mask_flow.positions is not None:
        positions = mask_flow.positions.relative(slices.positions)
    if cfg.separate_optimisers:
        emas, rows = _train_separate(slices, positions, mask_flow, image_flow, cfg, dev, gen, quiet)
    else:
        emas, rows = _train_joint(slices, positions, mask_flow, image_flow, cfg, dev, gen, quiet)
    trained_mask = MaskFlow(
        emas[0].eval(),
        mask_flow.encoding,
        mask_flow.sdf_width,
        mask_flow.positions,
        mask_flow.cleanup,
    )
    trained_image = None if image_flow is None else ImageFlow(emas[1].eval())
    return TrainedFlows(trained_mask, trained_image, rows)


def _train_joint(slices, positions, mask_flow, image_flow, cfg, dev, gen, quiet):
    """Stage 1 as it always was: one batch, one summed loss, one AdamW and clip per step.
    Returns the EMA networks ``[mask, image]`` and the log rows."""
    opt = _Optimiser([mask_flow.net, image_flow.net], cfg.lr, cfg.steps, cfg)
    rows, t0 = [], time.perf_counter()
    bar = progress(total=cfg.steps, quiet=quiet, desc="synth train", unit="step")
    for step in range(cfg.steps):
        images, masks, pos = _batch(slices, positions, cfg, gen, dev)
        mask_loss = mask_flow.loss(masks, gen, cfg.class_dropout, pos)
        image_loss = image_flow.loss(images, masks, gen)
        loss = mask_loss + image_loss
        _check_finite(loss, step)
        lr = opt.step(loss, step)
        rows.append(
            {
                "step": step + 1,
                "lr": lr,
                "mask_loss": mask_loss.item(),
                "image_loss": image_loss.item(),
                "seconds": time.perf_counter() - t0,
            }
        )
        bar.update(1)
        bar.set_postfix(mask=f"{mask_loss.item():.3f}", image=f"{image_loss.item():.3f}")
    bar.close()
    return opt.emas, rows


def _train_separate(slices, positions, mask_flow, image_flow, cfg, dev, gen, quiet):
    """Each flow its own optimiser, clip, schedule and stream; the mask flow may run more
    (cheap, mask-only) steps than the image flow. Returns the EMA networks ``[mask]`` or
    ``[mask, image]`` and the log rows (a flow's cells are empty after its last step)."""
    mask_steps = cfg.mask_total_steps
    image_steps = 0 if image_flow is None else cfg.steps
    mask_gen = torch.Generator().manual_seed(cfg.seed + MASK_STREAM)
    mask_opt = _Optimiser([mask_flow.net], cfg.mask_lr or cfg.lr, mask_steps, cfg)
    image_opt = None if image_flow is None else _Optimiser([image_flow.net], cfg.lr, cfg.steps, cfg)
    total = max(mask_steps, image_steps)
    rows, t0 = [], time.perf_counter()
    bar = progress(total=total, quiet=quiet, desc="synth train", unit="step")
    for step in range(total):
        row = {"step": step + 1}
        if step < image_steps:
            images, masks, _ = _batch(slices, None, cfg, gen, dev)
            image_loss = image_flow.loss(images, masks, gen)
            _check_finite(image_loss, step)
            row["lr"] = image_opt.step(image_loss, step)
            row["image_loss"] = image_loss.item()
        if step < mask_steps:
            _, masks, pos = _batch(slices, positions, cfg, mask_gen, dev)
            mask_loss = mask_flow.loss(masks, mask_gen, cfg.class_dropout, pos)
            _check_finite(mask_loss, step)
            row["mask_lr"] = mask_opt.step(mask_loss, step)
            row["mask_loss"] = mask_loss.item()
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        bar.update(1)
        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("mask_loss", "image_loss") if k in row})
    bar.close()
    emas = mask_opt.emas + ([] if image_opt is None else image_opt.emas)
    return emas, rows


def _preview(model: SynthModel, slices: SliceSet, path: Path, seed: int) -> None:
    """Real pairs, generated images for the real masks, generated masks and their images."""
    gen = torch.Generator().manual_seed(seed)
    n = min(8, len(slices))
    idx = torch.linspace(0, len(slices) - 1, n).long()
    real_masks = slices.masks[idx]
    fake_masks = model.mask_flow.sample(n, model.size, gen, model.sample_steps)
    on_real = model.image_flow.sample(real_masks, gen, model.sample_steps)
    on_fake = model.image_flow.sample(fake_masks, gen, model.sample_steps)
    save_grid(
        path,
        [("real", slices.images[idx]), ("generated, real mask", on_real)],
        masks=real_masks,
    )
    save_grid(
        path.with_name(path.stem + "_masks.png"),
        [("generated pair", on_fake)],
        masks=fake_masks,
    )
