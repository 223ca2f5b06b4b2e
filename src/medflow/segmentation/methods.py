"""A segmentation method is a class: its network, its training loss, its samplers and what it
exports, and its name, which every checkpoint stores (as nnU-Net stores ``trainer_name``).

=======================  ================================================================
``unet``                 the backbone trained discriminatively: one softmax; with dropout,
                         Monte-Carlo dropout samples
``medflowseg``           flow matching from noise to the mask, the instantaneous field
                         alone: Euler, Heun or refinement of the one-step estimate, one
                         evaluation by default
``medflowseg-shortcut``  MedFlowSeg that also learns shortcut jumps: one evaluation per
                         posterior sample (:mod:`medflow.flows.shortcut`)
``diffusion``            the backbone trained to predict DDPM noise, MedSegDiff-style:
                         DDIM or DDPM
=======================  ================================================================

:func:`method_for` is the one place that reads a training config to pick the class; the rest
of the code asks the method (training, validation, prediction, the uncertainty path, counting
and export), so nothing branches on ``model``, ``parameterization`` or ``step_input``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from medflow.errors import MedflowError, OptionError
from medflow.flows.diffusion import (
    DIFFUSION_SAMPLERS,
    NUM_TRAIN_STEPS,
    DiffusionSchedule,
    network_time,
    q_sample,
)
from medflow.flows.encoding import flow_to_probs, mask_to_flow
from medflow.flows.losses import LossTerms, MedFlowSegLoss, epsilon_loss
from medflow.flows.parameterization import FlowField
from medflow.flows.paths import LinearPath, PathSample, sample_time
from medflow.flows.samplers import SAMPLERS, one_step
from medflow.flows.shortcut import ShortcutDraw, consistency_target, sample_jumps, shortcut_loss
from medflow.models.unet import NetConfig, SegNet
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.inference import (
    REFINE,
    SHORTCUT,
    SamplingOptions,
    diffusion_probs,
    flow_probs,
    unet_probs,
)

# the share of rows trained on a self-conditioning estimate (Chen et al. 2022 use one half:
# the other half keeps the first step, which has no estimate, trained as often)
SELF_CONDITION_RATE = 0.5


@dataclass(frozen=True)
class TrainBatch:
    """One optimiser step's data and where its loss is computed.

    Attributes:
        images: ``(B, C, H, W)`` the whole global batch.
        masks: ``(B, H, W)`` its label maps.
        model: the forward pass (the network wrapped in DDP under torchrun).
        net: the bare network (for a target that must not go through DDP).
        gen: the run's generator: every rank draws the whole batch's noise and times from
            it, so the ranks stay in step and their rows together are the one-process batch.
        rows: this rank's rows of the batch (all of them in one process).
    """

    images: torch.Tensor
    masks: torch.Tensor
    model: nn.Module
    net: SegNet
    gen: torch.Generator
    rows: slice


class Method:
    """What every method answers. Subclasses set the class attributes and override what
    differs; an instance carries the training config its checkpoint stores."""

    name: ClassVar[str]
    kind: ClassVar[str]  # how messages call it: "UNet", "flow", "diffusion"
    samplers: ClassVar[tuple[str, ...]]
    default_sampler: ClassVar[str]
    # steps of each sampler when none are asked for (refine: the estimate and one correction)
    default_steps: ClassVar[dict[str, int]] = {"euler": 1, "heun": 1, SHORTCUT: 1, REFINE: 2}
    # how validation samples during training
    validation: ClassVar[SamplingOptions] = SamplingOptions(steps=1, sampler="euler")
    # whether one evaluation draws a posterior sample (the uncertainty path's samples)
    posterior: ClassVar[bool] = False

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def net_config(self, in_channels: int, num_classes: int) -> NetConfig:
        """The network this method trains."""
        cfg = self.cfg
        return NetConfig(
            in_channels=in_channels,
            num_classes=num_classes,
            channels=cfg.channels,
            flow=self.kind != "UNet",
            dbsa=cfg.dbsa,
            faa=cfg.faa,
            image_branch=cfg.image_branch,
            dbsa_version=cfg.dbsa_version,
            faa_version=cfg.faa_version,
            faa_levels=cfg.faa_levels,
            step_input=self.posterior,
            self_condition=cfg.self_condition,
            dropout=cfg.dropout,
        )

    def loss(self, batch: TrainBatch) -> LossTerms:
        """Loss terms of one batch on this rank's rows."""
        raise NotImplementedError

    def resolve(self, options: SamplingOptions) -> SamplingOptions:
        """``options`` with ``"auto"`` and ``None`` replaced by this method's defaults, checked.

        Raises:
            OptionError: a sampler this method does not take, or steps it cannot run.
        """
        sampler = self.default_sampler if options.sampler == "auto" else options.sampler
        if sampler not in self.samplers:
            raise OptionError(self._sampler_message(sampler))
        steps = self.default_steps.get(sampler, 1) if options.steps is None else options.steps
        if steps < 1 or options.samples < 1:
            raise ValueError(f"steps and samples must be >= 1, got {steps} and {options.samples}")
        return dataclasses.replace(options, sampler=sampler, steps=steps)

    def _sampler_message(self, sampler: str) -> str:
        takes = " or ".join(repr(s) for s in self.samplers)
        if sampler == SHORTCUT:
            return (
                "sampler 'shortcut' needs a model trained with shortcut jumps (medflow train "
                f"--shortcut-fraction > 0); this {self.kind} model takes {takes}"
            )
        if sampler in DIFFUSION_SAMPLERS:
            return (
                f"sampler {sampler!r} is for diffusion models; this {self.kind} model takes {takes}"
            )
        return f"unknown sampler {sampler!r}; this {self.kind} model takes {takes}"

    def probs(
        self,
        net: nn.Module,
        images: torch.Tensor,
        options: SamplingOptions,
        per_sample=False,
        noise: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Class probabilities of network-ready ``images`` under ``options`` (resolved here),
        ``(N, K, H, W)`` or with ``per_sample`` ``(S, N, K, H, W)``
        (:mod:`medflow.segmentation.inference`). ``noise``, one ``(N, K, H, W)`` tensor per
        sample, replaces a flow's or diffusion's starting draws (a UNet draws none and ignores
        it)."""
        raise NotImplementedError

    def stochastic(self, net_cfg: NetConfig) -> bool:
        """Whether this method's samples differ from one another."""
        return True

    def mask_options(self, options: SamplingOptions) -> SamplingOptions:
        """The resolved options a predicted mask is drawn with."""
        return self.resolve(options)

    def sample_options(self, options: SamplingOptions) -> tuple[SamplingOptions, bool]:
        """The resolved options the samples of the uncertainty path are drawn with, and
        whether the mask comes from :meth:`mask_options` apart from them (else the samples
        are fused into the mask)."""
        return self.resolve(options), False

    def export_module(self, net: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
        """The module ``medflow export`` writes for a trained network, and its inputs."""
        raise MedflowError(f"{self.name}: export covers one-call predictors (MedFlowSeg, UNet)")


class UNet(Method):
    """The same backbone trained discriminatively (cross-entropy + Dice), no time input."""

    name, kind = "unet", "UNet"
    # a UNet ignores a flow sampler's steps: one call
    samplers, default_sampler = ("euler", "heun"), "euler"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.loss_fn = _flow_loss(cfg)

    def loss(self, batch: TrainBatch) -> LossTerms:
        return self.loss_fn.segmentation_only(
            batch.model(batch.images[batch.rows]), batch.masks[batch.rows]
        )

    def probs(self, net, images, options, per_sample=False, noise=None):
        o = self.resolve(options)
        return unet_probs(
            net,
            images,
            samples=o.samples,
            seed=o.seed,
            batch_size=o.batch_size,
            per_sample=per_sample,
        )

    def stochastic(self, net_cfg: NetConfig) -> bool:
        return net_cfg.dropout > 0  # Monte-Carlo dropout; otherwise every call is the same

    def export_module(self, net):
        return UNetProbs(net).eval(), ("image",)


class MedFlowSeg(Method):
    """Flow matching from Gaussian noise to the encoded mask, conditioned on the image
    (docs/MODEL.md): the loss is flow matching plus cross-entropy + Dice on the endpoint."""

    name, kind = "medflowseg", "flow"
    samplers, default_sampler = ("euler", "heun", REFINE), "euler"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.loss_fn = _flow_loss(cfg)
        self.path = LinearPath()

    def _path_sample(self, batch: TrainBatch) -> tuple[PathSample, torch.Tensor, torch.Tensor]:
        """A point on the path for every row (noise and times drawn for the whole batch),
        cut to this rank's rows: the sample, the encoded masks and the jump sizes."""
        x1 = mask_to_flow(batch.masks, batch.net.cfg.num_classes)
        x0 = torch.randn(x1.shape, generator=batch.gen).to(x1.device)
        t, d = self._times(x1.shape[0], batch.gen)
        t, d = t.to(x1.device), d.to(x1.device)
        x0, x1, t, d = (v[batch.rows] for v in (x0, x1, t, d))
        sample = self.path.sample(x0, x1, t)
        if self.cfg.recycle_fraction:
            sample = self._recycle(batch, sample, x0, d)
        return sample, x1, d

    def _recycle(self, batch: TrainBatch, sample: PathSample, x0, d) -> PathSample:
        """Recycling (Fu et al. 2023): on ``recycle_fraction`` of the rows (drawn for the whole
        batch) that are at ``t > 0`` and jump 0, the state is built from the network's own
        one-step estimate instead of the mask, ``x_t = (1 - t) x0 + t x1_hat(x0, 0)``, with
        the same noise, as :func:`~medflow.flows.samplers.refine` re-noises it. The loss
        still scores the true mask, so these rows learn to correct the estimate."""
        n = batch.masks.shape[0]
        pick = (torch.rand(n, generator=batch.gen) < self.cfg.recycle_fraction)[batch.rows]
        pick = pick.to(x0.device) & (sample.t > 0) & (d == 0)
        if not bool(pick.any()):
            return sample
        t = sample.t[pick]
        probs = self._first_pass(
            batch.net, x0[pick], torch.zeros_like(t), batch.images[batch.rows][pick], d[pick]
        )
        tt = t.view(-1, 1, 1, 1)
        x_t = sample.x_t.clone()
        x_t[pick] = ((1.0 - tt) * x0[pick] + tt * (2.0 * probs - 1.0)).to(x_t.dtype)
        # dx_t stays x1 - x0: the endpoint loss scores x1_hat against the mask, not dx_t
        return dataclasses.replace(sample, x_t=x_t)

    def _first_pass(self, net: nn.Module, x, t, images, d) -> torch.Tensor:
        """Class probabilities ``(B, K, H, W)`` of the network's endpoint at ``(x, t)``, read
        with no estimate, without gradient and with dropout (if any) off: what a sampler's
        step would predict there, as an input and never a path for the gradient."""
        with torch.no_grad(), _evaluating(net):
            return torch.softmax(net(x, t, images, **self._jump_input(d)).float(), dim=1)

    def _jump_input(self, d: torch.Tensor) -> dict:
        """The network's jump-size argument for rows of jump sizes ``d`` (none here)."""
        return {}

    def _estimate(self, batch: TrainBatch, sample: PathSample, d, images) -> torch.Tensor:
        """Self-conditioning input ``(B, K, H, W)`` (Chen et al. 2022): on a random half of
        the rows (drawn for the whole batch) the network's own estimate at the same
        ``(x_t, t)`` from a first pass (:meth:`_first_pass`), zeros on the others, so the
        network learns both to use an estimate and to do without one (the first step)."""
        n = batch.masks.shape[0]
        use = (torch.rand(n, generator=batch.gen) < SELF_CONDITION_RATE)[batch.rows]
        use = use.to(sample.x_t.device)
        est = torch.zeros(sample.x_t.shape, device=sample.x_t.device)
        if bool(use.any()):
            est[use] = self._first_pass(
                batch.net, sample.x_t[use], sample.t[use], images[use], d[use]
            )
        return est

    def _predict(self, batch: TrainBatch, sample: PathSample, d, images):
        """The trained pass: logits of this rank's rows, and the self-conditioning estimate
        they read (None without self-conditioning)."""
        extra = self._jump_input(d)
        est = self._estimate(batch, sample, d, images) if self.cfg.self_condition else None
        if est is not None:
            extra["estimate"] = est
        return batch.model(sample.x_t, sample.t, images, **extra), est

    def _times(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training times ``(B,)`` by the configured schedule, and jump sizes (all 0)."""
        cfg = self.cfg
        t = sample_time(
            batch,
            cfg.time_schedule,
            loc=cfg.time_loc,
            scale=cfg.time_scale,
            zero_fraction=cfg.time_zero_fraction,
            generator=gen,
        )
        return t, torch.zeros(batch)

    def loss(self, batch: TrainBatch) -> LossTerms:
        sample, x1, d = self._path_sample(batch)
        images, masks = batch.images[batch.rows], batch.masks[batch.rows]
        logits, _ = self._predict(batch, sample, d, images)
        return self.loss_fn(logits, sample, x1, masks)

    def field(self, net: nn.Module, step: float | None = None) -> FlowField:
        """The velocity field of a network trained by this method."""
        return FlowField(net, self.cfg.parameterization, self.cfg.min_gap, step=step)

    def probs(self, net, images, options, per_sample=False, noise=None):
        o = self.resolve(options)
        return flow_probs(
            net,
            images,
            **_draws(o),
            parameterization=self.cfg.parameterization,
            min_gap=self.cfg.min_gap,
            per_sample=per_sample,
            shortcut_max_steps=self.cfg.shortcut_max_steps,
            noise=noise,
            refine_start=o.refine_start,
        )

    def export_module(self, net):
        return OneStepFlow(self.field(net)).eval(), ("image", "noise")


class ShortcutMedFlowSeg(MedFlowSeg):
    """MedFlowSeg whose network also reads a jump size ``d``: the last ``shortcut_fraction``
    of every batch is trained by shortcut self-consistency, so one evaluation from noise
    draws a posterior sample. The mask is the one-evaluation posterior mean (one Euler step
    of the instantaneous field); the uncertainty path's samples are shortcut jumps."""

    name = "medflowseg-shortcut"
    samplers = ("euler", "heun", REFINE, SHORTCUT)
    posterior = True

    def _jump_input(self, d):
        return {"step": d}

    def _jump_rows(self, batch: int) -> int:
        """Rows of a global batch of ``batch`` trained on shortcut jumps (the last ones)."""
        return round(self.cfg.shortcut_fraction * batch)

    def _times(self, batch, gen):
        """The first rows at jump 0 (flow matching, the configured time schedule), the last
        ``shortcut_fraction`` of the batch on the shortcut grid
        (:func:`medflow.flows.shortcut.sample_jumps`)."""
        n_jump = self._jump_rows(batch)
        t, d = super()._times(batch - n_jump, gen)
        if n_jump:
            draw = sample_jumps(n_jump, self.cfg.shortcut_max_steps, gen)
            t, d = torch.cat([t, draw.t]), torch.cat([d, draw.d])
        return t, d

    def loss(self, batch: TrainBatch) -> LossTerms:
        sample, x1, d = self._path_sample(batch)
        images, masks = batch.images[batch.rows], batch.masks[batch.rows]
        logits, est = self._predict(batch, sample, d, images)
        return self._with_shortcut(logits, sample, x1, masks, images, d, batch.net, est)

    def _with_shortcut(
        self, logits, sample: PathSample, x1, masks, images, d, net, est=None
    ) -> LossTerms:
        """Flow matching + segmentation loss on the rows at jump 0, shortcut
        self-consistency on the others. Each term is its loss over this rank's rows of that
        kind, weighted by this rank's share of them (rows of the kind here / rows here,
        over the kind's share of the global batch), so the mean of the ranks' losses under
        DDP is the one-process loss for every per-row mean (squared errors, cross-entropy;
        the batch-pooled soft Dice stays per rank, docs/DISTRIBUTED.md). In one process the
        weights are 1: each term is the plain mean over its rows. ``est``: the
        self-conditioning estimate the rows read (None: none), where a jump's target starts."""
        cfg = self.cfg
        flat, jump = d == 0, d > 0
        n_jump = self._jump_rows(cfg.batch_size)
        glob = {"flat": 1.0 - n_jump / cfg.batch_size, "jump": n_jump / cfg.batch_size}
        zero = logits.sum() * 0.0  # a part with no rows on this rank adds nothing
        flat_total, flow, seg, sc = zero, zero, zero, zero
        if bool(flat.any()):
            part = PathSample(sample.x_t[flat], sample.dx_t[flat], sample.t[flat])
            terms = self.loss_fn(logits[flat], part, x1[flat], masks[flat])
            weight = (int(flat.sum()) / d.shape[0]) / glob["flat"]
            flow, seg = terms.flow * weight, terms.seg * weight
            # the loss function's own total, reweighted (a non-finite total, a diverged
            # run, stays non-finite)
            flat_total = (
                terms.total
                + cfg.flow_weight * (flow - terms.flow)
                + cfg.seg_weight * (seg - terms.seg)
            )
        if bool(jump.any()):
            x_t, t = sample.x_t[jump], sample.t[jump]
            start = None if est is None else est[jump]
            target = self._jump_target(net, x_t, t, d[jump], images[jump], start)
            sc = shortcut_loss(logits[jump], x_t, t, target)
            sc = sc * (int(jump.sum()) / d.shape[0]) / glob["jump"]
        return LossTerms(flat_total + sc, flow, seg, sc)

    def _jump_target(self, net, x_t, t, d, images, estimate=None) -> torch.Tensor:
        """Self-consistency target of jumps ``d`` from ``x_t`` by the current network, with
        dropout (if any) off: a target is the network's estimate, not a random draw. A
        self-conditioned network's first half-jump reads ``estimate`` (what the trained
        pass read) and its second the first's estimate, as two sampler steps would."""
        field = self.field(net)
        with _evaluating(net):
            cond = field.condition(images).trajectory(estimate)
            return consistency_target(
                lambda x, tt, dd: field.jump(x, tt, dd, cond),
                x_t,
                ShortcutDraw(t=t, d=d),
                self.cfg.shortcut_max_steps,
            )

    def resolve(self, options):
        o = super().resolve(options)
        if o.sampler == SHORTCUT and o.steps & (o.steps - 1):
            raise OptionError(
                f"steps {o.steps}: the shortcut sampler takes jumps of trained sizes, so steps "
                "must be a power of 2 (1, 2, 4, ...)"
            )
        return o

    def mask_options(self, options):
        """With ``sampler="auto"`` the one-evaluation posterior mean (one Euler step of the
        instantaneous field from seed ``options.seed``; ``samples`` and ``steps`` then
        concern only the samples of the uncertainty path); otherwise ``options``."""
        if options.sampler == "auto":
            return self.resolve(dataclasses.replace(options, sampler="euler", steps=1, samples=1))
        return self.resolve(options)

    def sample_options(self, options):
        """With ``sampler="auto"`` samples are one shortcut jump each (or ``steps`` jumps)
        and the mask is the separate posterior mean of :meth:`mask_options`."""
        if options.sampler == "auto":
            steps = 1 if options.steps is None else options.steps
            return self.resolve(dataclasses.replace(options, sampler=SHORTCUT, steps=steps)), True
        return self.resolve(options), False


class Diffusion(Method):
    """The backbone in flow mode trained to predict DDPM noise (MedSegDiff-style): uniform
    steps over DDPM's 1000, the noise's squared error alone."""

    name, kind = "diffusion", "diffusion"
    samplers, default_sampler = tuple(DIFFUSION_SAMPLERS), "ddim"
    # DDIM-50, the budget MedSegDiff's users run with a fast solver, and every DDPM step
    default_steps = {"ddim": 50, "ddpm": NUM_TRAIN_STEPS}
    # DDIM with 10 steps costs ten evaluations, a cheap proxy for the samplers used to predict
    validation = SamplingOptions(sampler="ddim", steps=10)

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.schedule = DiffusionSchedule.linear()

    def loss(self, batch: TrainBatch) -> LossTerms:
        # x0 is DDPM's noise: the network reads the noised mask and must name x0
        x1 = mask_to_flow(batch.masks, batch.net.cfg.num_classes)
        x0 = torch.randn(x1.shape, generator=batch.gen).to(x1.device)
        i = torch.randint(self.schedule.num_steps, (x1.shape[0],), generator=batch.gen)
        rows = batch.rows
        x0, x1, i, images = x0[rows], x1[rows], i[rows].to(x1.device), batch.images[rows]
        x_t = q_sample(x1, i, x0, self.schedule)
        return epsilon_loss(batch.model(x_t, network_time(i, self.schedule.num_steps), images), x0)

    def resolve(self, options):
        if options.sampler not in ("auto", *self.samplers):
            raise OptionError(
                f"sampler {options.sampler!r} does not fit a diffusion model (it predicts "
                "noise); use 'ddim' (steps 10 or 50) or 'ddpm' (steps 1000)"
            )
        o = super().resolve(options)
        if o.steps > NUM_TRAIN_STEPS:
            raise OptionError(
                f"steps {o.steps}: a diffusion model has {NUM_TRAIN_STEPS} steps to sample"
            )
        return o

    def probs(self, net, images, options, per_sample=False, noise=None):
        o = self.resolve(options)
        return diffusion_probs(net, images, **_draws(o), per_sample=per_sample, noise=noise)

    def export_module(self, net):
        raise MedflowError(
            "a diffusion model predicts in 10 to 1000 network calls; export covers one-call "
            "predictors (MedFlowSeg, UNet)"
        )


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (UNet, MedFlowSeg, ShortcutMedFlowSeg, Diffusion)
}


def method_for(cfg: TrainConfig) -> Method:
    """The method a training config trains: its ``model``, and for MedFlowSeg with a
    ``shortcut_fraction`` above 0 the shortcut variant."""
    if cfg.model == "medflowseg" and cfg.shortcut_fraction > 0:
        return ShortcutMedFlowSeg(cfg)
    return METHODS[cfg.model](cfg)


def method_from_checkpoint(ckpt: dict) -> Method:
    """The method of a checkpoint: the class its ``"method"`` names, with the training config
    stored beside it. A checkpoint written before methods were named has no ``"method"``; its
    config says which it is, the same way :func:`method_for` decides for a new run.

    Raises:
        ValueError: an unknown method name, or one its config does not train.
    """
    cfg = TrainConfig.from_dict(ckpt["config"])
    method = method_for(cfg)
    stored = ckpt.get("method", method.name)
    if stored not in METHODS:
        raise ValueError(f"unknown method {stored!r}; this medflow knows {sorted(METHODS)}")
    if stored != method.name:
        raise ValueError(f"method {stored!r} does not match its stored config ({method.name})")
    return method


def _draws(o: SamplingOptions) -> dict:
    """The sampling fields of resolved options, as the inference paths take them."""
    return {
        "steps": o.steps,
        "sampler": o.sampler,
        "samples": o.samples,
        "seed": o.seed,
        "batch_size": o.batch_size,
    }


@contextlib.contextmanager
def _evaluating(net: nn.Module) -> Iterator[None]:
    """``net`` in eval mode inside the block, its mode restored after."""
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def _flow_loss(cfg: TrainConfig) -> MedFlowSegLoss:
    return MedFlowSegLoss(
        cfg.parameterization, cfg.loss_weighting, cfg.min_gap, cfg.flow_weight, cfg.seg_weight
    )


class OneStepFlow(nn.Module):
    """``(image, noise) -> probs``: one Euler step of a flow network from ``t = 0``; what
    ``medflow export`` writes for MedFlowSeg.

    Shapes: image ``(B, C, H, W)``, noise ``(B, K, H, W)``, probs ``(B, K, H, W)``.
    """

    def __init__(self, field: FlowField) -> None:
        super().__init__()
        self.net = field.net
        self.field = field

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return flow_to_probs(one_step(self.field, noise, self.field.condition(image)))


class UNetProbs(nn.Module):
    """``image (B, C, H, W) -> probs (B, K, H, W)`` of the plain UNet."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(image), dim=1)


assert set(SAMPLERS) <= set(MedFlowSeg.samplers)  # every flow integrator is offered
