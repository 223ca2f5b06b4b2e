"""Train MedFlowSeg (or the UNet baseline) on a dataset folder.

One function, :func:`train`, puts data, model, flow and optimiser together. A run folder
holds ``config.json``, ``log.csv``, ``curves.png``, ``checkpoint_last.pt`` (resumable: model,
EMA, optimiser, scheduler, RNG states), ``checkpoint_final.pt`` (the EMA weights at the last
step) and ``checkpoint_best.pt`` (the EMA weights at the best validation Dice).

As in nnU-Net, the final checkpoint is the one to predict with: with a validation set of one
or two cases, "best on validation" tracks those cases' idiosyncrasies (on mni152-tissue the
validation slab's Dice fell while held-out test Dice rose, docs/SEGMENTATION.md).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medflow import __version__
from medflow.data.datasets import (
    SliceSet,
    load_slices,
    plan_preprocessing,
    split_cases,
    split_slab,
)
from medflow.data.io import atomic_write
from medflow.data.layout import load_dataset
from medflow.data.transforms import augment_batch
from medflow.errors import MedflowError, OutputExistsError
from medflow.flows.encoding import mask_to_flow
from medflow.flows.losses import MedFlowSegLoss
from medflow.flows.paths import LinearPath, sample_time
from medflow.models.unet import NetConfig, SegNet
from medflow.segmentation.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.inference import predict_probs
from medflow.segmentation.runtime import autocast, configure_threads, progress, resolve_device

LAST, BEST, FINAL = "checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_final.pt"
RUN_FILES = ("config.json", "log.csv", LAST, BEST, FINAL)
SLAB_GAP = 2  # slices dropped each side of a validation slab cut from a single volume


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    final_checkpoint: Path
    best_checkpoint: Path
    best_val_dice: float | None
    best_step: int
    steps: int
    seconds: float


def build_net(cfg: TrainConfig, in_channels: int, num_classes: int) -> SegNet:
    return SegNet(
        NetConfig(
            in_channels=in_channels,
            num_classes=num_classes,
            channels=cfg.channels,
            flow=cfg.model == "medflowseg",
            dbsa=cfg.dbsa,
            faa=cfg.faa,
        )
    )


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to zero at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float, step: int) -> None:
    # short runs: ramp the decay so early averages are not dominated by the random init
    d = min(decay, (1.0 + step) / (10.0 + step))
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1.0 - d)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


def dice_per_class(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> list[float]:
    """Foreground Dice pooled over all slices (validation at training size)."""
    out = []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = int(p.sum() + r.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return out


def _load_split(
    train_cases, val_cases, cfg: TrainConfig, prep, k: int
) -> tuple[SliceSet, SliceSet | None]:
    """Training and validation slices: whole cases held out, or, for a dataset of a single
    volume, a slab of it with a gap on each side."""
    if val_cases:
        return load_slices(train_cases, prep, k), load_slices(val_cases, prep, k)
    everything = load_slices(train_cases, prep, k)
    if cfg.val_fraction <= 0 or len(everything) < 2 * SLAB_GAP + 2:
        return everything, None
    train_idx, val_idx = split_slab(len(everything), cfg.val_fraction, SLAB_GAP)
    return everything.subset(train_idx), everything.subset(val_idx)


def _check_run_dir(out: Path, resume: bool, force: bool) -> None:
    held = [n for n in RUN_FILES if (out / n).exists()]
    if resume:
        if not (out / LAST).exists():
            raise MedflowError(f"{out / LAST}: nothing to resume (no checkpoint_last.pt)")
    elif held and not force:
        raise OutputExistsError(out)


def _payload(cfg, net_cfg, prep, spec, step, model, extra) -> dict:
    return {
        "format": FORMAT,
        "medflow_version": __version__,
        "config": cfg.to_dict(),
        "net": net_cfg.to_dict(),
        "preprocessing": prep.to_dict(),
        "labels": dict(spec.labels),
        "channel_names": list(spec.channel_names),
        "dataset": str(spec.root),
        "step": step,
        "model": model,
        **extra,
    }


def train(
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    device: str = "auto",
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
) -> TrainResult:
    """Train on the dataset at ``data`` into the run folder ``out``.

    Args:
        data: nnU-Net raw v2 or MSD dataset folder.
        out: run folder (created).
        cfg: hyperparameters; ignored when resuming (the checkpoint's config is used).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        resume: continue from ``out/checkpoint_last.pt``.
        force: overwrite a run folder that already holds results.
        quiet: no progress bar.
    """
    out = Path(out)
    _check_run_dir(out, resume, force)
    state = load_checkpoint(out / LAST) if resume else None
    if state is not None:
        cfg = TrainConfig.from_dict(state["config"])
    spec = load_dataset(data)
    configure_threads(cfg.threads)
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    k = spec.num_classes
    train_cases, val_cases = split_cases(spec.training, cfg.val_fraction, cfg.split_seed)
    prep = plan_preprocessing(spec, train_cases, (cfg.size, cfg.size), cfg.slice_axis)
    train_set, val_set = _load_split(train_cases, val_cases, cfg, prep, k)
    net = build_net(cfg, len(spec.channel_names), k).to(dev)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    loss_fn = MedFlowSegLoss(
        cfg.parameterization, cfg.loss_weighting, cfg.min_gap, cfg.flow_weight, cfg.seg_weight
    )
    path = LinearPath()

    start, best_val, best_step = 0, None, 0
    if state is not None:
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"]["data"])
        torch.set_rng_state(state["rng"]["torch"])
        start, best_val, best_step = state["step"], state["best_val"], state["best_step"]

    out.mkdir(parents=True, exist_ok=True)
    run_info = {
        "config": cfg.to_dict(),
        "data": str(Path(data).resolve()),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "train_slices": len(train_set),
        "val_slices": len(val_set) if val_set else 0,
        "preprocessing": prep.to_dict(),
        "medflow_version": __version__,
    }
    atomic_write(
        out / "config.json", lambda tmp: tmp.write_text(json.dumps(run_info, indent=2) + "\n")
    )
    class_names = spec.class_names[1:]
    columns = [
        "step",
        "lr",
        "loss",
        "flow_loss",
        "seg_loss",
        "val_dice",
        *[f"val_{n}" for n in class_names],
        "seconds",
    ]
    log_rows = _read_log_until(out / "log.csv", start) if resume else []

    def checkpoint_payload(step: int) -> dict:
        return _payload(
            cfg,
            net.cfg,
            prep,
            spec,
            step,
            net.state_dict(),
            {
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "best_val": best_val,
                "best_step": best_step,
                "rng": {"data": gen.get_state(), "torch": torch.get_rng_state()},
            },
        )

    bar = progress(total=cfg.steps, initial=start, quiet=quiet, desc="train", unit="step")
    t_start = time.perf_counter()
    elapsed0 = log_rows[-1]["seconds"] if log_rows else 0.0
    n_train = len(train_set)
    for step in range(start, cfg.steps):
        idx = torch.randint(n_train, (cfg.batch_size,), generator=gen)
        images = train_set.images[idx].to(dev)
        masks = train_set.masks[idx].to(dev)
        if cfg.augment:
            images, masks = augment_batch(images, masks, k, gen)
        with autocast(dev):
            if net.cfg.flow:
                x1 = mask_to_flow(masks, k)
                x0 = torch.randn(x1.shape, generator=gen).to(dev)
                t = sample_time(
                    x1.shape[0],
                    cfg.time_schedule,
                    loc=cfg.time_loc,
                    scale=cfg.time_scale,
                    zero_fraction=cfg.time_zero_fraction,
                    generator=gen,
                ).to(dev)
                sample = path.sample(x0, x1, t)
                logits = net(sample.x_t, t, images)
                terms = loss_fn(logits, sample, x1, masks)
            else:
                terms = loss_fn.segmentation_only(net(images), masks)
        loss = terms.total
        if not torch.isfinite(loss):
            bar.close()
            raise MedflowError(
                f"training diverged: loss is {loss.item()} at step {step}; the last good "
                f"checkpoint is {out / LAST if (out / LAST).exists() else 'not written yet'}; "
                "try a lower --lr"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema_update(ema, net, cfg.ema_decay, step)
        done = step + 1
        row = {
            "step": done,
            "lr": sched.get_last_lr()[0],
            "loss": loss.item(),
            "flow_loss": terms.flow.item(),
            "seg_loss": terms.seg.item(),
        }

        if val_set is not None and (done % cfg.val_every == 0 or done == cfg.steps):
            probs = predict_probs(
                ema, val_set.images, parameterization=cfg.parameterization, min_gap=cfg.min_gap
            )
            per_class = dice_per_class(probs.argmax(1), val_set.masks, k)
            row["val_dice"] = float(np.mean(per_class))
            row.update({f"val_{n}": d for n, d in zip(class_names, per_class)})
            if best_val is None or row["val_dice"] > best_val:
                best_val, best_step = row["val_dice"], done
                save_checkpoint(
                    out / BEST,
                    _payload(
                        cfg, net.cfg, prep, spec, done, ema.state_dict(), {"best_val": best_val}
                    ),
                )
            bar.set_postfix(val_dice=f"{row['val_dice']:.3f}")
        row["seconds"] = elapsed0 + time.perf_counter() - t_start
        log_rows.append(row)
        bar.update(1)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(out / LAST, checkpoint_payload(done))
        if "val_dice" in row or done % cfg.checkpoint_every == 0:
            _write_log(out / "log.csv", columns, log_rows)
    bar.close()
    final = _payload(cfg, net.cfg, prep, spec, cfg.steps, ema.state_dict(), {"best_val": None})
    save_checkpoint(out / FINAL, final)
    if val_set is None:
        # nothing to select on: best is final
        best_step = cfg.steps
        save_checkpoint(out / BEST, final)
    _write_log(out / "log.csv", columns, log_rows)
    from medflow.report.curves import plot_training_curves

    plot_training_curves(out / "log.csv", out / "curves.png")
    return TrainResult(
        out,
        out / FINAL,
        out / BEST,
        best_val,
        best_step,
        cfg.steps,
        log_rows[-1]["seconds"] if log_rows else 0.0,
    )


def _write_log(path: Path, columns: list[str], rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="")
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def _read_log_until(path: Path, step: int) -> list[dict]:
    """Rows of an earlier run's log up to the resumed step (a killed run may have logged
    steps after its last checkpoint; those are trained again)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    for r in rows:
        r["step"] = int(r["step"])
    return [r for r in rows if r["step"] <= step]
