"""Stage 1 of AlignFlow (``medflow synth train``): a mask flow and a mask-conditioned image
flow, trained together on the labelled source dataset.

The source is read exactly as ``medflow train`` reads it (same normalisation, slice axis,
crop and size), so generated images live where the segmenter's inputs live. Every step
trains both flows on the same batch of slices; the exponential moving averages of their
weights are saved. The run folder holds ``synth.pt``, ``config.json``, ``log.csv`` and
``preview.png`` (generated pairs beside real ones).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

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
from medflow.synthesis.mask_flow import MaskFlow
from medflow.synthesis.model import SynthModel, start_run
from medflow.synthesis.preview import save_grid

CHECKPOINT = "synth.pt"
RUN_FILES = (CHECKPOINT, "config.json", "log.csv", "preview.png", "preview_masks.png")


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
    k, c = spec.num_classes, len(spec.channel_names)

    mask_flow = MaskFlow.build(k, cfg.mask_channels)
    image_flow = ImageFlow.build(c, k, cfg.image_channels)
    nets = [mask_flow.net.to(dev), image_flow.net.to(dev)]
    emas = [copy.deepcopy(n).requires_grad_(False) for n in nets]
    params = [p for n in nets for p in n.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps)
    )

    rows, t0 = [], time.perf_counter()
    bar = progress(total=cfg.steps, quiet=quiet, desc="synth train", unit="step")
    for step in range(cfg.steps):
        idx = torch.randint(len(slices), (cfg.batch_size,), generator=gen)
        images, masks = slices.images[idx], slices.masks[idx]
        if cfg.hflip:
            flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-2), images)
            masks = torch.where(flip[:, None, None], masks.flip(-2), masks)
        images, masks = images.to(dev), masks.to(dev)
        mask_loss = mask_flow.loss(masks, gen, cfg.class_dropout)
        image_loss = image_flow.loss(images, masks, gen)
        loss = mask_loss + image_loss
        if not torch.isfinite(loss):
            raise MedflowError(f"synth train: loss became {loss.item()} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for ema, net in zip(emas, nets):
            ema_update(ema, net, cfg.ema_decay, step)
        rows.append(
            {
                "step": step + 1,
                "lr": sched.get_last_lr()[0],
                "mask_loss": mask_loss.item(),
                "image_loss": image_loss.item(),
                "seconds": time.perf_counter() - t0,
            }
        )
        bar.update(1)
        bar.set_postfix(mask=f"{mask_loss.item():.3f}", image=f"{image_loss.item():.3f}")
    bar.close()

    model = SynthModel(
        mask_flow=MaskFlow(emas[0].eval()),
        image_flow=ImageFlow(emas[1].eval()),
        prep=prep,
        labels=dict(spec.labels),
        channel_names=list(spec.channel_names),
        file_ending=spec.file_ending,
        background_level=background_level(slices.images, spec),
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
