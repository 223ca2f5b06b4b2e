"""Train MedFlowSeg (or the UNet or diffusion baseline) on a dataset folder.

One function, :func:`train`, puts data, model, flow and optimiser together. A run folder
holds ``config.json``, ``log.csv``, ``curves.png``, ``checkpoint_last.pt`` (resumable: model,
EMA, optimiser, scheduler, RNG states), ``checkpoint_final.pt`` (the EMA weights at the last
step) and ``checkpoint_best.pt`` (the EMA weights at the best validation Dice).

As in nnU-Net, the final checkpoint is the one to predict with: with a validation set of one
or two cases, "best on validation" tracks those cases' idiosyncrasies (on mni152-tissue the
validation slab's Dice fell while held-out test Dice rose, docs/SEGMENTATION.md).

Under ``torchrun --nproc_per_node N`` the same function trains with DistributedDataParallel:
``cfg.batch_size`` stays the global batch, every rank draws the whole batch's randomness from
the same generator and trains on its own ``batch_size / N`` rows of it, and rank 0 alone
logs, validates and writes the run folder (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
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
from medflow.data.naming import SYNTHETIC_PREFIX, is_synthetic
from medflow.data.patches import PatchSampler
from medflow.data.plan import Plan, format_plan, write_plan
from medflow.data.transforms import Preprocessing, augment_batch
from medflow.engine.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from medflow.engine.distributed import (
    Ranks,
    barrier,
    from_main,
    mean_over_ranks,
    process_group,
)
from medflow.engine.logs import read_log_until, write_log
from medflow.engine.runtime import autocast, configure_threads, progress, resolve_device
from medflow.engine.schedule import ema_update, lr_factor
from medflow.errors import DataError, MedflowError, OutputExistsError
from medflow.flows.losses import LossTerms
from medflow.metrics.overlap import dice_per_class
from medflow.models.unet import SegNet
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.methods import TrainBatch, method_for
from medflow.segmentation.planning import PLANS, compute_kind, resolve_plan
from medflow.segmentation.postprocess import case_volumes, choose_largest
from medflow.segmentation.sliding import window_probs

LAST, BEST, FINAL = "checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_final.pt"
POSTPROCESSING = "postprocessing.json"
RUN_FILES = ("config.json", "log.csv", PLANS, POSTPROCESSING, LAST, BEST, FINAL)
# what atomic_write leaves when its process is killed mid-write: ".{stem}.partial-{pid}.{ext}"
PARTIAL = re.compile(
    r"\.(config|log|curves|plans|postprocessing|checkpoint_last|checkpoint_best|checkpoint_final)"
    r"\.partial-\d+\.(json|csv|png|pt)"
)
BUDGET_PROBE_STEPS = 6  # steps timed before a time budget fixes the total (the first is not)
# a time-budgeted run spends at most this share of its budget on validation
VALIDATION_SHARE = 0.1
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
    """The network ``cfg``'s method trains."""
    return SegNet(method_for(cfg).net_config(in_channels, num_classes))


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


def _real_and_synthetic(slices: SliceSet, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the real and of the synthetic training slices (``synthetic_fraction``);
    refuses a training set without both."""
    synthetic = torch.tensor([is_synthetic(c) for c in slices.case_ids], dtype=torch.bool)
    if synthetic.all() or not synthetic.any():
        what = "no real" if synthetic.all() else f"no synthetic ({SYNTHETIC_PREFIX}_*)"
        raise DataError(
            data, f"synthetic_fraction needs real and synthetic training cases; it has {what} ones"
        )
    return (~synthetic).nonzero().flatten(), synthetic.nonzero().flatten()


def _check_run_dir(out: Path, resume: bool, force: bool) -> None:
    held = [n for n in RUN_FILES if (out / n).exists()]
    if resume:
        if not (out / LAST).exists():
            raise MedflowError(f"{out / LAST}: nothing to resume (no checkpoint_last.pt)")
    elif held and not force:
        raise OutputExistsError(out)


def _remove_partials(out: Path) -> list[Path]:
    """Delete temporary files of a writer that was killed mid-write (a run folder has one
    writer at a time, so any such file is stale); returns what was deleted."""
    stale = [p for p in out.glob(".*.partial-*") if PARTIAL.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class _Run:
    """One training run: data, network, optimiser and their state, and the operations on
    them. ``train`` drives it; each method does one thing."""

    def __init__(
        self,
        data: Path,
        out: Path,
        cfg: TrainConfig,
        device: torch.device,
        state: dict | None,
        ranks: Ranks,
        plan: Plan | None = None,
    ) -> None:
        self.out, self.cfg, self.ranks, self.plan = out, cfg, ranks, plan
        # this rank's rows of every global batch (all of them in a single process)
        self.part = ranks.batch_part(cfg.batch_size)
        self.spec = load_dataset(data)
        configure_threads(cfg.threads)
        self.dev = device
        torch.manual_seed(cfg.seed)
        # one generator for data order, noise, times and augmentation: resumable exactly
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.k = self.spec.num_classes
        train_cases, val_cases = split_cases(self.spec.training, cfg.val_fraction, cfg.split_seed)
        self.prep = (
            Preprocessing.from_dict(state["preprocessing"])
            if state is not None
            else plan_preprocessing(
                self.spec,
                train_cases,
                cfg.patch or (cfg.size, cfg.size),
                cfg.slice_axis,
                spacing=plan.target_spacing if plan else None,
                context=cfg.context_slices,
            )
        )
        # a planned run trains on patches of its slices, a third centred on foreground
        self.patches = (
            PatchSampler(
                cfg.patch,
                num_classes=self.k,
                foreground_fraction=cfg.foreground_fraction,
                class_balanced=cfg.class_balanced,
            )
            if cfg.patch
            else None
        )
        self.train_set, self.val_set = _load_split(train_cases, val_cases, cfg, self.prep, self.k)
        self.pools = _real_and_synthetic(self.train_set, data) if cfg.synthetic_fraction else None
        if cfg.epochs and state is None:  # passes over the slices -> steps, stored resolved
            steps = math.ceil(cfg.epochs * len(self.train_set) / cfg.batch_size)
            self.cfg = cfg = dataclasses.replace(cfg, steps=steps)
        self.net = build_net(cfg, self.prep.input_channels(), self.k).to(self.dev)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        # the forward pass goes through DDP (gradients averaged over ranks); optimiser, EMA
        # and checkpoints use the bare network, so its state_dict has no "module." prefix
        self.model = self.net
        if ranks.active:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.dev.index] if self.dev.type == "cuda" else None
            )
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        # the stall counter (and, for lr_schedule "plateau", the reductions so far)
        self.plateau = Plateau.from_dict(state.get("plateau") if state is not None else None)
        # the total steps read at every step: a time budget fixes them after the first few
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lambda s: (
                self.plateau.scale(self.cfg)
                * lr_factor(s, self.cfg.warmup_steps, self.cfg.steps, self.cfg.lr_schedule)
            ),
        )
        self.method = method_for(cfg)
        self.start, self.best_val, self.best_step = 0, None, 0
        if state is not None:
            self.net.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.gen.set_state(state["rng"]["data"])
            torch.set_rng_state(state["rng"]["torch"])
            self.start, self.best_val = state["step"], state["best_val"]
            self.best_step = state["best_step"]
        self.class_names = self.spec.class_names[1:]
        self.columns = [
            "step",
            "lr",
            "loss",
            "flow_loss",
            "seg_loss",
            "shortcut_loss",
            "val_dice",
            *[f"val_dice_{n}" for n in self.class_names],
            "seconds",
        ]
        self.log_rows = read_log_until(out / "log.csv", self.start) if state else []

    def describe(self, data: Path) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "data": str(Path(data).resolve()),
            "device": str(self.dev),
            "threads": torch.get_num_threads(),
            "processes": self.ranks.world,
            "train_slices": len(self.train_set),
            "val_slices": len(self.val_set) if self.val_set else 0,
            "preprocessing": self.prep.to_dict(),
            "medflow_version": __version__,
        }

    def losses(self, images: torch.Tensor, masks: torch.Tensor) -> LossTerms:
        """Loss terms of one batch by the run's method (:mod:`medflow.segmentation.methods`).

        ``images`` and ``masks`` are the whole global batch; the network sees this rank's
        rows of it. Every rank draws the noise and times of the whole batch too, so the
        ranks' generators stay in step and their rows together are the single-process batch.
        """
        return self.method.loss(
            TrainBatch(images, masks, self.model, self.net, self.gen, self.part)
        )

    def clock(self) -> float:
        """Seconds on the run's clock: wall time, or with ``budget_clock="cpu"`` this
        process's CPU time (all its threads), which other jobs on the machine do not eat."""
        return time.process_time() if self.cfg.budget_clock == "cpu" else time.perf_counter()

    def fit_budget(self, done: int, elapsed: float | None) -> None:
        """Fix ``cfg.steps`` to what fits the time budget (rank 0 decides from ``elapsed``,
        the seconds its steps so far took, and every rank takes its answer): the steps
        after the first cost their mean, each validation what one timed pass costs now.
        Validation is spaced so that it takes at most :data:`VALIDATION_SHARE` of the
        budget (``val_every`` only grows): on 128 slices of a planned lesion set, one
        sliding-window pass costs ~20 steps, which every 50 steps was 30 % of the run."""
        fitted = None
        if self.ranks.main:
            first = self.log_rows[0]["seconds"] if self.log_rows else 0.0
            per_step = (elapsed - first) / max(1, done - 1)
            val_every = self.cfg.val_every
            if self.val_set is not None:
                t0 = self.clock()
                self._val_probs()
                val_cost = self.clock() - t0
                spaced = math.ceil(val_cost / (VALIDATION_SHARE * max(per_step, 1e-9)))
                val_every = max(val_every, spaced)
                per_step += val_cost / val_every
            left = self.cfg.budget_seconds - elapsed
            fitted = (done + 1 + max(0, int(left / max(per_step, 1e-9))), val_every)
        steps, val_every = from_main(fitted)
        self.cfg = dataclasses.replace(self.cfg, steps=steps, val_every=val_every)

    def step(self, step: int) -> dict:
        """One optimiser step; returns its log row."""
        cfg = self.cfg
        idx = self.draw_batch()
        images = self.train_set.images[idx].to(self.dev)
        # with several annotations per case, one rater's at random per row
        masks = self.train_set.draw_masks(idx, self.gen).to(self.dev)
        if self.patches is not None:
            images, masks = self.patches.sample(images, masks.long(), self.gen)
        if cfg.augment:
            images, masks = augment_batch(images, masks, self.k, self.gen)
        with autocast(self.dev):
            terms = self.losses(images, masks)
        # the global batch's loss terms (the mean of the ranks'), so that every rank sees the
        # same value and a divergence stops all of them together
        total, flow, seg, shortcut = mean_over_ranks(terms.parts()).tolist()
        if not math.isfinite(total):
            last = self.out / LAST
            raise MedflowError(
                f"training diverged: loss is {total} at step {step + 1}; the last "
                f"good checkpoint is {last if last.exists() else 'not written yet'}; "
                "try a lower --lr"
            )
        self.opt.zero_grad(set_to_none=True)
        terms.total.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        ema_update(self.ema, self.net, cfg.ema_decay, step)
        return {
            "step": step + 1,
            "lr": self.sched.get_last_lr()[0],
            "loss": total,
            "flow_loss": flow,
            "seg_loss": seg,
            "shortcut_loss": shortcut,
        }

    def draw_batch(self) -> torch.Tensor:
        """Indices ``(batch_size,)`` of the next global batch's training slices: uniform, or
        with ``synthetic_fraction`` a fixed number from the synthetic pool, in random order."""
        cfg = self.cfg
        if self.pools is None:
            return torch.randint(len(self.train_set), (cfg.batch_size,), generator=self.gen)
        real, synthetic = self.pools
        n_syn = round(cfg.synthetic_fraction * cfg.batch_size)
        picks = [
            real[torch.randint(len(real), (cfg.batch_size - n_syn,), generator=self.gen)],
            synthetic[torch.randint(len(synthetic), (n_syn,), generator=self.gen)],
        ]
        # shuffled, so that under DDP every rank's part of the batch holds both kinds
        return torch.cat(picks)[torch.randperm(cfg.batch_size, generator=self.gen)]

    def _val_probs(self) -> torch.Tensor:
        """The EMA network's probabilities on the validation slices."""
        if self.patches is None:
            return self.method.probs(self.ema, self.val_set.images, self.method.validation)
        # whole slices, window by window, as predict sees them
        return window_probs(
            self.method, self.ema, self.val_set.images, self.method.validation, self.cfg.patch
        )

    def validate(self, done: int) -> dict:
        """Dice of the EMA weights on the validation slices; keeps the best checkpoint."""
        probs = self._val_probs()
        per_class = dice_per_class(probs.argmax(1), self.val_set.masks, self.k)
        row = {
            "val_dice": float(np.mean(per_class)),
            **{f"val_dice_{n}": d for n, d in zip(self.class_names, per_class)},
        }
        if self.best_val is None or row["val_dice"] > self.best_val:
            self.best_val, self.best_step = row["val_dice"], done
            save_checkpoint(
                self.out / BEST, self.payload(done, self.ema.state_dict(), best_val=self.best_val)
            )
        return row

    def plateaued(self, val_dice: float | None, done: int) -> bool:
        """With ``plateau_patience``, at a validation step before the last: whether the
        validation Dice has stalled (rank 0 decides, every rank takes its answer, so all
        stop together); the run then ends here (``cfg.steps = done``)."""
        cfg = self.cfg
        if not cfg.plateau_patience or done % cfg.val_every or done >= cfg.steps:
            return False
        stop = None
        if self.ranks.main:
            self.plateau, stop = self.plateau.after(val_dice, cfg)
        # every rank takes rank 0's decision and its reductions (their learning rates agree)
        reductions = self.plateau.reductions
        self.plateau, stop = from_main((self.plateau, stop))
        if self.plateau.reductions > reductions:
            # from the next step on (the scheduler already set it with the old scale)
            for group in self.opt.param_groups:
                group["lr"] *= cfg.plateau_factor
        if stop:
            self.cfg = dataclasses.replace(cfg, steps=done)
        return stop

    def payload(self, step: int, weights: dict, **extra) -> dict:
        return {
            "format": FORMAT,
            "medflow_version": __version__,
            "method": self.method.name,
            "config": self.cfg.to_dict(),
            "net": self.net.cfg.to_dict(),
            "preprocessing": self.prep.to_dict(),
            "plan": self.plan.to_dict() if self.plan else None,
            "labels": dict(self.spec.labels),
            "channel_names": list(self.spec.channel_names),
            "dataset": str(self.spec.root),
            "step": step,
            "model": weights,
            **extra,
        }

    def save_last(self, step: int) -> None:
        save_checkpoint(
            self.out / LAST,
            self.payload(
                step,
                self.net.state_dict(),
                ema=self.ema.state_dict(),
                optimizer=self.opt.state_dict(),
                scheduler=self.sched.state_dict(),
                best_val=self.best_val,
                best_step=self.best_step,
                plateau=self.plateau.to_dict(),
                rng={"data": self.gen.get_state(), "torch": torch.get_rng_state()},
            ),
        )

    def write_log(self) -> None:
        write_log(self.out / "log.csv", self.columns, self.log_rows)

    def choose_postprocessing(self) -> dict | None:
        """Largest component per class where it raises the validation cases' mean Dice
        (:mod:`medflow.segmentation.postprocess`); written to ``postprocessing.json``."""
        if self.val_set is None:
            return None
        labels = self._val_probs().argmax(1).numpy()
        preds = case_volumes(labels, self.val_set.case_ids)
        refs = case_volumes(self.val_set.masks.numpy(), self.val_set.case_ids)
        post = choose_largest([p for _, p in preds], [r for _, r in refs], self.k)
        text = json.dumps(post, indent=2) + "\n"
        atomic_write(self.out / POSTPROCESSING, lambda tmp: tmp.write_text(text))
        return post

    def finish(self) -> TrainResult:
        """Final and (without validation) best checkpoints, the log and the curves; with
        validation, the post-processing it chooses for the final weights."""
        post = self.choose_postprocessing()
        final = self.payload(
            self.cfg.steps, self.ema.state_dict(), best_val=None, postprocessing=post
        )
        save_checkpoint(self.out / FINAL, final)
        if self.val_set is None:
            self.best_step = self.cfg.steps  # nothing to select on: best is final
            save_checkpoint(self.out / BEST, final)
        self.write_log()
        from medflow.report.curves import plot_training_curves

        plot_training_curves(self.out / "log.csv", self.out / "curves.png")
        seconds = self.log_rows[-1]["seconds"] if self.log_rows else 0.0
        return TrainResult(
            self.out,
            self.out / FINAL,
            self.out / BEST,
            self.best_val,
            self.best_step,
            self.cfg.steps,
            seconds,
        )


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
    ranks = Ranks.from_env()
    dev = resolve_device(device)
    with process_group(ranks, dev):
        _check_run_dir(out, resume, force)
        barrier()  # every rank has looked at the folder before rank 0 writes to it
        state = load_checkpoint(out / LAST) if resume else None
        if state is not None:  # the config and plan the run started with, resolved
            cfg = TrainConfig.from_dict(state["config"])
            plan = Plan.from_dict(state["plan"]) if state.get("plan") else None
        else:
            cfg, plan = resolve_plan(cfg, load_dataset(data), compute_kind(dev))
        run = _Run(Path(data), out, cfg, dev, state, ranks, plan)
        result = _loop(run, Path(data), quiet) if ranks.main else _follow(run)
        # rank 0's result everywhere; also keeps other ranks from returning before the
        # run folder is complete
        return from_main(result)


@dataclass(frozen=True)
class Plateau:
    """Where a run stands against ``plateau_patience``: the best validation Dice, the
    validations since it last rose by ``plateau_delta``, and (``lr_schedule="plateau"``)
    how often a stall has reduced the learning rate. Kept in the resumable checkpoint."""

    best: float | None = None
    since: int = 0
    reductions: int = 0

    def scale(self, cfg: TrainConfig) -> float:
        """What the reductions so far multiply the learning rate by."""
        return cfg.plateau_factor**self.reductions if cfg.lr_schedule == "plateau" else 1.0

    def after(self, val_dice: float, cfg: TrainConfig) -> tuple[Plateau, bool]:
        """The state after one more validation, and whether the run stops there: a stall
        stops it, unless ``lr_schedule="plateau"`` has reductions left (then the rate is
        reduced and the count starts again)."""
        if self.best is None or val_dice > self.best + cfg.plateau_delta:
            return Plateau(val_dice, 0, self.reductions), False
        since = self.since + 1
        if since < cfg.plateau_patience:
            return Plateau(self.best, since, self.reductions), False
        if cfg.lr_schedule == "plateau" and self.reductions < cfg.plateau_reductions:
            return Plateau(self.best, 0, self.reductions + 1), False
        return Plateau(self.best, since, self.reductions), True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> Plateau:
        """A checkpoint's state (one written before it was kept: a fresh count)."""
        return cls(**d) if d else cls()


def _loop(run: _Run, data: Path, quiet: bool) -> TrainResult:
    """Rank 0 (or the only process): train, log, validate and write the run folder."""
    cfg, out = run.cfg, run.out
    out.mkdir(parents=True, exist_ok=True)
    _remove_partials(out)
    _write_info(run, data)
    if run.plan is not None:
        write_plan(out / PLANS, run.plan)
        if not quiet:
            print(format_plan(run.plan), flush=True)
    elif not quiet:
        size = run.cfg.size
        print(
            f"plan: none (every slice resized to {size} x {size}, batch {run.cfg.batch_size}; "
            "--plan auto plans spacing, patch and batch from the data, `medflow plan DATA` "
            "shows that plan)",
            flush=True,
        )

    bar = progress(total=cfg.steps, initial=run.start, quiet=quiet, desc="train", unit="step")
    t_start = run.clock()
    elapsed0 = run.log_rows[-1]["seconds"] if run.log_rows else 0.0
    step = run.start
    try:
        while step < run.cfg.steps:
            row = run.step(step)
            step = done = row["step"]
            if done == budget_probe(run.cfg):
                run.fit_budget(done, elapsed0 + run.clock() - t_start)
                bar.total = run.cfg.steps
                _write_info(run, data)
            cfg = run.cfg
            if run.val_set is not None and (done % cfg.val_every == 0 or done == cfg.steps):
                row.update(run.validate(done))
                bar.set_postfix(val_dice=f"{row['val_dice']:.3f}")
                if run.plateaued(row["val_dice"], done):  # the run ends here, steps resolved
                    bar.total, cfg = done, run.cfg
                    _write_info(run, data)
            row["seconds"] = elapsed0 + run.clock() - t_start
            run.log_rows.append(row)
            bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                run.save_last(done)
            if "val_dice" in row or done % cfg.checkpoint_every == 0:
                run.write_log()
    finally:
        bar.close()
    return run.finish()


def _write_info(run: _Run, data: Path) -> None:
    """``config.json``: the run's config as resolved so far, data, machine, preprocessing."""
    text = json.dumps(run.describe(data), indent=2) + "\n"
    atomic_write(run.out / "config.json", lambda tmp: tmp.write_text(text))


def budget_probe(cfg: TrainConfig) -> int | None:
    """The step after which a time budget fixes the total steps (None without a budget):
    a few steps, inside the warm-up, so that no learning rate already used depends on it."""
    if cfg.budget_seconds is None:
        return None
    return max(2, min(BUDGET_PROBE_STEPS, cfg.warmup_steps))


def _follow(run: _Run) -> None:
    """Ranks other than 0: the same optimiser steps, nothing written (and rank 0's budget)."""
    step = run.start
    while step < run.cfg.steps:
        run.step(step)
        step += 1
        if step == budget_probe(run.cfg):
            run.fit_budget(step, None)
        if run.val_set is not None:
            run.plateaued(None, step)
