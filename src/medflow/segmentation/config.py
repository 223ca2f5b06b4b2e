"""Configuration of ``medflow train``: one frozen dataclass with CPU-sized defaults.

The resolved config is written to ``run_dir/config.json`` and stored in every checkpoint
together with the network and preprocessing, so ``medflow predict`` needs only the
checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from medflow.engine.schedule import SCHEDULES
from medflow.flows.diffusion import EPSILON
from medflow.flows.losses import WEIGHTINGS
from medflow.flows.parameterization import PARAMETERIZATIONS

MODELS = ("medflowseg", "unet", "diffusion")
# what a stored config that lacks these fields was trained with
PRE_FIELD_DEFAULTS = {
    "shortcut_fraction": 0.0,
    "dbsa_version": 1,
    "faa_version": 1,
    "faa_levels": 1,
}
TIME_SCHEDULES = ("uniform", "logit_normal")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run.

    Attributes:
        model: ``"medflowseg"`` (flow matching, the default), ``"unet"`` (the same
            backbone trained discriminatively) or ``"diffusion"`` (the same flow-mode
            backbone trained to predict DDPM noise, MedSegDiff-style; predict with
            ``--sampler ddim`` or ``ddpm``), the latter two for comparison.
        plan: ``"none"`` (every slice resized to ``size x size``), ``"auto"`` (fingerprint
            the training data and plan from it: slice axis, spacing, patch, batch, depth,
            patch sampling; docs/PLANNING.md) or the path of a ``plans.json`` written by
            ``medflow plan`` (the way to change a planned field: ``medflow plan --set``).
            With a plan, slices are resampled to its spacing (aspect ratio kept), training
            takes patches and prediction slides a window; ``size``, ``slice_axis``,
            ``batch_size``, ``patch``, ``foreground_fraction`` and ``class_balanced`` come
            from the plan, and the depth too, with widths from ``channels`` (its first
            width, doubling per level, at most its last).
        patch: training patch ``(H, W)`` of a planned run (set from the plan).
        foreground_fraction: fraction of every batch's patches centred on a foreground
            voxel (nnU-Net's third; set from the plan).
        class_balanced: foreground patches pick a present class uniformly first (rare or
            small classes; set from the plan).
        size: slices are resized to ``size x size`` (without a plan).
        slice_axis: spatial axis to slice along; None picks the coarsest (see
            :func:`medflow.data.transforms.choose_slice_axis`).
        context_slices: neighbouring slices on each side given as extra input channels
            (2.5D; 0 is plain 2D). Volumes only; with ``plan``, the plan's value.
        val_fraction: fraction of training cases held out for validation.
        channels: backbone width per resolution level.
        dbsa: use Dual-Branch Spatial Attention (else plain addition of image features).
        faa: use Frequency-Aware Attention at the bottleneck.
        dbsa_version: 1 (the published DBSA, the default) or 2 (image structure at several
            scales gates the flow features; docs/MODEL.md 6.1).
        faa_version: 1 (the published FAA, the default) or 2 (its spectral gate also reads
            each frequency bin's position; docs/MODEL.md 6.2).
        faa_levels: FAA on this many of the coarsest levels: 1 the bottleneck alone (the
            default), more adds the next finer levels' decoder blocks (at most the depth).
        image_branch: image encoder injected at every level (off needs ``dbsa`` and ``faa``
            off: the image then enters only concatenated with ``x_t``, for comparison).
        parameterization: ``"endpoint"`` (the network predicts the mask's class
            probabilities and the velocity follows from them, docs/MODEL.md) or
            ``"velocity"`` (the network outputs the velocity directly: the naive flow
            segmenter, for comparison; needs ``seg_weight=0``). ``model="diffusion"`` sets
            it to ``"epsilon"`` (the network predicts the noise) and ignores the time,
            weighting and loss-weight options: its steps are uniform over DDPM's 1000 and
            its loss is the noise's squared error alone.
        time_schedule: ``"logit_normal"`` or ``"uniform"`` training times.
        time_loc: location of the logit-normal (negative favours the noise end).
        time_scale: scale of the logit-normal.
        time_zero_fraction: fraction of training times set to exactly 0, the one-step
            operating point.
        loss_weighting: ``"endpoint"`` or ``"velocity"`` (see :mod:`medflow.flows.losses`).
        min_gap: floor on ``1 - t``.
        flow_weight: weight of the flow-matching term.
        seg_weight: weight of the cross-entropy + Dice term on the endpoint.
        shortcut_fraction: fraction of every batch trained by shortcut self-consistency
            (:mod:`medflow.flows.shortcut`): the network learns the average velocity of
            jumps, so one evaluation from noise draws a posterior sample (``predict
            --sampler shortcut``, and ``--uncertainty``'s samples). 0 trains the
            instantaneous field alone (no step input). MedFlowSeg with the endpoint
            parameterisation only; other models ignore it.
        shortcut_max_steps: the Euler steps of the instantaneous field that the one-step
            sample distils (a power of 2; jumps of ``2/M .. 1`` are trained).
        self_condition: the network also reads its previous endpoint estimate (class
            probabilities; zeros when there is none, as for one-step prediction); half of
            every batch is trained on the estimate of a first pass without gradient
            (self-conditioning, Chen et al. 2022; docs/MODEL.md). MedFlowSeg with the
            endpoint parameterisation only.
        recycle_fraction: fraction of the rows at ``t > 0`` (and jump 0) whose state is built
            from the network's own detached one-step estimate instead of the true mask,
            ``x_t = (1 - t) x0 + t x1_hat(x0, 0)``, the loss still scoring the true mask
            (recycling, Fu et al. 2023): the states a refinement from the one-step estimate
            meets. MedFlowSeg with the endpoint parameterisation only.
        dropout: dropout rate in the backbone's residual blocks (0: none); with
            ``model="unet"`` it is the Monte-Carlo dropout baseline (``predict --samples``).
        steps: optimiser steps (with ``time_budget``, replaced by what fits the budget).
        epochs: train for this many passes over the training slices instead of ``steps``
            (0: off): ``steps = ceil(epochs * slices / batch_size)``, resolved when the run
            starts and stored. An epoch here is a pass over the data, as in MONAI and plain
            PyTorch, not nnU-Net's fixed 250 iterations.
        time_budget: train for this long instead of ``steps`` (``"15m"``, ``"90s"``,
            ``"1.5h"``; empty: off). After the first few steps (inside the warm-up, so no
            learning rate already used depends on it) the run times its steps and one
            validation pass and fixes ``steps`` to what fits, so the cosine schedule still
            ends at zero; the budget covers training and validation, not the final
            checkpoint write or prediction. The resolved steps are logged and stored.
        budget_clock: what ``time_budget`` and the log's ``seconds`` count: ``"wall"``
            (elapsed time, the default) or ``"cpu"`` (this process's CPU time over all its
            threads: "15 CPU-minutes", which jobs sharing the machine do not eat; one thread
            for 15 minutes on an idle machine is about the same).
        batch_size: slices per step.
        synthetic_fraction: with a training set of real and synthetic cases (``synth
            sample --include-source``; synthetic case ids start with ``synth_``), this
            fraction of every batch is drawn from the synthetic slices and the rest from the
            real ones, whatever their counts (0: every slice alike, as without synthetic
            data). A fixed ratio keeps the real data's weight when hundreds of synthetic
            pairs join a few dozen real slices.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up before cosine decay to zero.
        lr_schedule: ``"cosine"`` (decay to zero at ``steps``), ``"constant"`` (the peak
            after the warm-up) or ``"plateau"`` (the peak, multiplied by ``plateau_factor``
            each time the validation Dice stalls, as torch's ``ReduceLROnPlateau``; a stall
            after ``plateau_reductions`` of them ends the run). The last two are what
            ``plateau_patience`` needs.
        plateau_patience: a stall is this many validations in a row whose Dice has not
            risen more than ``plateau_delta`` above the best (0: off; ``steps`` is then the
            cap). A stall stops the run (``lr_schedule="plateau"``: once the rate has been
            reduced ``plateau_reductions`` times). The stored ``steps`` is the step it
            stopped at, so the stored config retrains the same run. Needs validation.
        plateau_delta: the rise in validation Dice that counts as progress.
        plateau_factor: with ``lr_schedule="plateau"``, what a stall multiplies the rate by.
        plateau_reductions: with ``lr_schedule="plateau"``, the reductions before a stall
            stops the run.
        grad_clip: clip the global gradient norm (0 disables).
        ema_decay: decay of the exponential moving average of weights.
        augment: random flips, small affine and intensity changes.
        val_every: validate (and keep the best checkpoint) every this many steps.
        checkpoint_every: write a resumable checkpoint every this many steps.
        seed: seeds data order, noise, times, augmentation and initialisation.
        split_seed: seeds the choice of validation cases, apart from ``seed`` so that runs
            with different seeds are validated on the same cases.
        threads: intra-op threads on CPU; None uses every core.
    """

    model: str = "medflowseg"
    plan: str = "none"
    patch: tuple[int, ...] = ()
    foreground_fraction: float = 1.0 / 3.0
    class_balanced: bool = False
    size: int = 96
    slice_axis: int | None = None
    context_slices: int = 0
    val_fraction: float = 0.15
    channels: tuple[int, ...] = (16, 32, 64, 128)
    dbsa: bool = True
    faa: bool = True
    image_branch: bool = True
    dbsa_version: int = 1
    faa_version: int = 1
    faa_levels: int = 1
    parameterization: str = "endpoint"
    time_schedule: str = "logit_normal"
    time_loc: float = -1.0
    time_scale: float = 1.0
    time_zero_fraction: float = 0.5
    loss_weighting: str = "endpoint"
    min_gap: float = 0.05
    flow_weight: float = 1.0
    seg_weight: float = 1.0
    shortcut_fraction: float = 0.25
    shortcut_max_steps: int = 8
    self_condition: bool = False
    recycle_fraction: float = 0.0
    dropout: float = 0.0
    steps: int = 300
    epochs: int = 0
    time_budget: str = ""
    budget_clock: str = "wall"
    batch_size: int = 16
    synthetic_fraction: float = 0.0
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    lr_schedule: str = "cosine"
    plateau_patience: int = 0
    plateau_delta: float = 0.002
    plateau_factor: float = 0.5
    plateau_reductions: int = 3
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    augment: bool = True
    val_every: int = 50
    checkpoint_every: int = 100
    seed: int = 0
    split_seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.model == "diffusion" and self.parameterization == "endpoint":
            # the default resolved: a noise-predicting network (stored, so predict knows)
            object.__setattr__(self, "parameterization", EPSILON)
        if self.model != "medflowseg" or self.parameterization != "endpoint":
            # shortcut jumps are trained on the endpoint flow only; stored resolved
            object.__setattr__(self, "shortcut_fraction", 0.0)
        checks = [
            (self.model in MODELS, f"model must be one of {MODELS}"),
            (
                self.time_schedule in TIME_SCHEDULES,
                f"time_schedule must be one of {TIME_SCHEDULES}",
            ),
            (self.loss_weighting in WEIGHTINGS, f"loss_weighting must be one of {WEIGHTINGS}"),
            (
                self.parameterization in (*PARAMETERIZATIONS, EPSILON),
                f"parameterization must be one of {(*PARAMETERIZATIONS, EPSILON)}",
            ),
            (
                (self.parameterization == EPSILON) == (self.model == "diffusion"),
                f"parameterization {EPSILON} goes with model diffusion, and only with it",
            ),
            (
                self.parameterization != "velocity" or self.seg_weight == 0,
                "seg_weight must be 0 with parameterization velocity (no class scores)",
            ),
            (self.size >= 8, "size must be at least 8"),
            (self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1"),
            (self.lr > 0, "lr must be positive"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (0.0 < self.min_gap <= 1.0, "min_gap must be in (0, 1]"),
            (0.0 <= self.time_zero_fraction <= 1.0, "time_zero_fraction must be in [0, 1]"),
            (
                self.val_every >= 1 and self.checkpoint_every >= 1,
                "val_every and checkpoint_every must be >= 1",
            ),
            (self.slice_axis in (None, 0, 1, 2), "slice_axis must be 0, 1 or 2"),
            (0 <= self.context_slices <= 16, "context_slices must be in 0..16"),
            (0.0 <= self.shortcut_fraction < 1.0, "shortcut_fraction must be in [0, 1)"),
            (0.0 <= self.recycle_fraction <= 1.0, "recycle_fraction must be in [0, 1]"),
            (
                not (self.self_condition or self.recycle_fraction)
                or (self.model == "medflowseg" and self.parameterization == "endpoint"),
                "self_condition and recycle_fraction need model medflowseg with the endpoint "
                "parameterization",
            ),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (0.0 <= self.synthetic_fraction < 1.0, "synthetic_fraction must be in [0, 1)"),
            (
                self.shortcut_max_steps >= 2
                and not self.shortcut_max_steps & (self.shortcut_max_steps - 1),
                "shortcut_max_steps must be a power of 2 >= 2",
            ),
            (
                self.shortcut_fraction == 0 or self.min_gap < 2 / self.shortcut_max_steps,
                "min_gap must be below the smallest trained jump 2 / shortcut_max_steps",
            ),
        ]
        checks.append(
            (
                self.time_budget == "" or _seconds(self.time_budget) is not None,
                "time_budget must be a positive duration like 15m, 90s or 1.5h",
            )
        )
        checks.append((self.epochs >= 0, "epochs must be >= 0"))
        checks.append(
            (
                self.dbsa_version in (1, 2) and self.faa_version in (1, 2),
                "dbsa_version and faa_version must be 1 or 2",
            )
        )
        checks.append(
            (
                1 <= self.faa_levels <= len(self.channels),
                "faa_levels must be between 1 and the number of levels",
            )
        )
        checks.append((self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {SCHEDULES}"))
        checks.append(
            (
                self.plateau_patience == 0
                or (self.lr_schedule in ("constant", "plateau") and self.val_fraction > 0),
                "plateau_patience needs lr_schedule constant or plateau and validation "
                "(val_fraction > 0)",
            )
        )
        checks.append(
            (
                self.lr_schedule != "plateau" or self.plateau_patience > 0,
                "lr_schedule plateau needs plateau_patience > 0 (the stall that reduces it)",
            )
        )
        checks.append(
            (
                self.plateau_patience >= 0
                and self.plateau_delta >= 0
                and self.plateau_reductions >= 0,
                "plateau fields >= 0",
            )
        )
        checks.append((0 < self.plateau_factor < 1, "plateau_factor must be in (0, 1)"))
        checks.append((self.budget_clock in ("wall", "cpu"), "budget_clock must be wall or cpu"))
        checks.append(
            (
                not (self.epochs and self.time_budget),
                "give epochs or time_budget, not both",
            )
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self})")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "patch", tuple(int(c) for c in self.patch))
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1] (got {self})")
        multiple = 2 ** (len(self.channels) - 1)
        if self.patch:
            if len(self.patch) != 2 or any(n < 8 or n % multiple for n in self.patch):
                raise ValueError(
                    f"patch must be two sizes >= 8, multiples of {multiple} for "
                    f"{len(self.channels)} levels, got {self.patch}"
                )
        elif self.size % multiple:
            raise ValueError(
                f"size must be a multiple of {multiple} for {len(self.channels)} "
                f"levels, got {self.size}"
            )

    @property
    def budget_seconds(self) -> float | None:
        """``time_budget`` in seconds; None without one."""
        return _seconds(self.time_budget) if self.time_budget else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        d = dict(d)
        for key in ("channels", "patch"):
            if key in d:
                d[key] = tuple(d[key])
        # a config stored before a field existed was trained without it: take the old
        # behaviour, not today's default (a resumed pre-shortcut run must rebuild the same
        # network)
        d = {**PRE_FIELD_DEFAULTS, **d}
        return cls(**d)


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def _seconds(text: str) -> float | None:
    """``"15m"`` -> 900.0, ``"90s"``/``"90"`` -> 90.0, ``"1.5h"`` -> 5400.0; None if not a
    positive duration."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", str(text))
    if not m:
        return None
    value = float(m.group(1)) * _UNITS[m.group(2) or ""]
    return value if value > 0 else None
