"""Soft predictions for batches of slices, one path per model kind, shared by validation,
``medflow predict`` and the cost counter.

Each path returns class probabilities ``(N, K, H, W)`` (float32, on CPU) for network-ready
slices ``(N, C, H, W)``, or with ``per_sample`` every sample's own, ``(S, N, K, H, W)``, not
averaged. Noise comes from CPU generators, sample ``j`` from one seeded with ``seed + j`` and
drawn for the whole set before batching, so results do not depend on the device or on
``batch_size``, and an ensemble of S samples is exactly the mean of S one-sample calls with
seeds ``seed .. seed + S - 1``. Flow and diffusion paths also take the starting noise
explicitly (``noise``, one ``(N, K, H, W)`` tensor per sample), as sliding windows do
(:mod:`medflow.segmentation.sliding`): each window gets its part of noise drawn for the whole
slice. Which path a checkpoint takes is its method's business
(:mod:`medflow.segmentation.methods`); nothing here looks at flags to guess the kind.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from medflow.engine.runtime import autocast
from medflow.flows.diffusion import DIFFUSION_SAMPLERS, EpsilonField
from medflow.flows.encoding import flow_to_probs
from medflow.flows.parameterization import FlowField
from medflow.flows.samplers import DEFAULT_REFINE_START, SAMPLERS, refine
from medflow.models.unet import SegNet
from medflow.uncertainty.fusion import FUSIONS

SHORTCUT = "shortcut"  # one jump-averaged Euler step per 1/steps: a posterior sample
REFINE = "refine"  # the one-step estimate, re-noised to t = refine_start, then Euler to 1
# Draws of one batch: (slices of the batch on the device, their rows in the whole set) -> one
# probability tensor (B, K, H, W) per sample
Draws = Callable[[torch.Tensor, slice], list[torch.Tensor]]


@dataclass(frozen=True)
class SamplingOptions:
    """How a model turns a slice into a soft mask.

    Attributes:
        steps: network steps; None takes the method's default (one Euler step, one network
            evaluation, for a flow model; 50 DDIM steps for a diffusion model).
        sampler: ``"euler"``, ``"heun"``, ``"refine"`` or ``"shortcut"`` for a flow model,
            ``"ddim"`` or ``"ddpm"`` for a diffusion model; ``"auto"`` takes the method's
            default.
        samples: noise draws averaged into one soft mask (an ensemble).
        seed: seed of the noise (sample ``s`` starts from seed ``seed + s``).
        batch_size: slices per network call.
        fusion: ``"mean"`` (argmax of the mean soft mask) or ``"vote"`` (majority vote of
            the samples' label maps); used by ``Predictor.predict_uncertain``.
        refine_start: where ``"refine"`` re-noises the one-step estimate, in (0, 1]
            (:func:`medflow.flows.samplers.refine`); other samplers ignore it.
    """

    steps: int | None = None
    sampler: str = "auto"
    samples: int = 1
    seed: int = 0
    batch_size: int = 32
    fusion: str = "mean"
    refine_start: float = DEFAULT_REFINE_START

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; expected one of {list(FUSIONS)}")
        if not 0.0 < self.refine_start <= 1.0:
            raise ValueError(f"refine_start must be in (0, 1], got {self.refine_start}")


def _noise(images: torch.Tensor, k: int, samples: int, seed: int) -> list[torch.Tensor]:
    """One ``(N, K, H, W)`` Gaussian draw per sample, sample ``j`` from seed ``seed + j``."""
    shape = (images.shape[0], k, *images.shape[-2:])
    return [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed + j))
        for j in range(samples)
    ]


def _given_noise(
    noise: list[torch.Tensor], images: torch.Tensor, k: int, samples: int
) -> list[torch.Tensor]:
    """``noise`` checked against what :func:`_noise` would draw for ``images``."""
    shape = (images.shape[0], k, *images.shape[-2:])
    if len(noise) != samples or any(tuple(z.shape) != shape for z in noise):
        got = [tuple(z.shape) for z in noise]
        raise ValueError(f"noise: expected {samples} tensors of shape {shape}, got {got}")
    return noise


@torch.no_grad()
def _batched(
    net: SegNet, images: torch.Tensor, batch_size: int, per_sample: bool, draws: Draws
) -> torch.Tensor:
    """Run ``draws`` over ``images`` in batches in eval mode (the network's mode restored
    after), and average its samples unless ``per_sample``."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            with autocast(device):
                probs = [p.float().cpu() for p in draws(x, slice(start, start + x.shape[0]))]
            out.append(torch.stack(probs) if per_sample else sum(probs) / len(probs))
    finally:
        net.train(was_training)
    return torch.cat(out, dim=1 if per_sample else 0)


def _check_counts(steps: int, samples: int) -> None:
    if steps < 1 or samples < 1:
        raise ValueError(f"steps and samples must be >= 1, got {steps} and {samples}")


def unet_probs(
    net: SegNet,
    images: torch.Tensor,
    *,
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    per_sample: bool = False,
) -> torch.Tensor:
    """A plain UNet: one softmax. It is deterministic unless it has dropout and more than one
    sample is asked for: then each sample is one draw of its dropout masks (Monte-Carlo
    dropout), seeded by ``seed + j`` and the batch's first row (so a draw does not depend on
    the other samples, but does on the batch size and the device). One sample (validation, a
    plain predict) runs it as trained, and without dropout ``per_sample`` gives ``S = 1``."""
    _check_counts(1, samples)
    mc_dropout = samples > 1 and any(isinstance(m, torch.nn.Dropout) for m in net.modules())

    def draws(x: torch.Tensor, rows: slice) -> list[torch.Tensor]:
        if not mc_dropout:
            return [torch.softmax(net(x).float(), dim=1)]
        return [_dropout_draw(net, x, seed + j, rows.start) for j in range(samples)]

    return _batched(net, images, batch_size, per_sample, draws)


def _dropout_draw(net: SegNet, x: torch.Tensor, seed: int, start: int) -> torch.Tensor:
    """Softmax of one draw of the network's dropout masks, seeded by ``seed`` and ``start``."""
    dropouts = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed * 1_000_003 + start)
        for m in dropouts:
            m.train()
        try:
            return torch.softmax(net(x).float(), dim=1)
        finally:
            for m in dropouts:
                m.eval()


def flow_probs(
    net: SegNet,
    images: torch.Tensor,
    *,
    steps: int = 1,
    sampler: str = "euler",
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    parameterization: str = "endpoint",
    min_gap: float = 0.05,
    per_sample: bool = False,
    shortcut_max_steps: int = 8,
    noise: list[torch.Tensor] | None = None,
    refine_start: float = DEFAULT_REFINE_START,
) -> torch.Tensor:
    """A flow network: integrate from Gaussian noise with ``sampler`` (``"euler"`` or
    ``"heun"``) for ``steps`` steps (one Euler step, one network evaluation, by default: from
    the same noise, one step lands on the posterior mean). ``"refine"`` takes that one-step
    estimate, re-noises it with the same starting noise to ``t = refine_start`` and takes the
    other ``steps - 1`` Euler steps from there (:func:`medflow.flows.samplers.refine`; the
    noise is the sample's own, so windows and batches see the same draws as the other
    samplers). A self-conditioned network reads, at every step, the estimate of the step
    before (none at the first). ``"shortcut"`` (a network trained
    with shortcut jumps, ``net.cfg.step_input``) takes ``steps`` jumps of size ``1 / steps``:
    one evaluation per posterior *sample* (:mod:`medflow.flows.shortcut`); from
    ``shortcut_max_steps`` on, jumps that small were never trained and it takes Euler steps
    of the instantaneous field instead (the ODE the jumps distil). The end state ``x`` maps
    to probabilities as ``(x + 1) / 2``, clipped at 0 and renormalised; samples from
    independent noise draws are averaged. ``noise`` (one ``(N, K, H, W)`` tensor per sample)
    replaces the draws from ``seed``; passing the drawn noise gives the same result. Which
    samplers a model takes is checked by its method; here an unknown name is a ValueError."""
    _check_counts(steps, samples)
    solvers = {**SAMPLERS, REFINE: functools.partial(refine, start=refine_start)}
    # shortcut jumps are Euler steps of the jump-averaged velocity
    solvers[SHORTCUT] = SAMPLERS["euler"]
    if sampler not in solvers:
        raise ValueError(f"unknown flow sampler {sampler!r}; expected one of {sorted(solvers)}")
    jump = 1.0 / steps if sampler == SHORTCUT and steps < shortcut_max_steps else None
    field = FlowField(net, parameterization, min_gap, step=jump)
    solve = solvers[sampler]
    k = net.cfg.num_classes
    if noise is None:
        noise = _noise(images, k, samples, seed)
    else:
        noise = _given_noise(noise, images, k, samples)

    def draws(x: torch.Tensor, rows: slice) -> list[torch.Tensor]:
        cond = field.condition(x)  # features once per batch, shared by every sample
        return [
            flow_to_probs(solve(field, z[rows].to(x.device), cond.trajectory(), steps).float())
            for z in noise
        ]

    return _batched(net, images, batch_size, per_sample, draws)


def diffusion_probs(
    net: SegNet,
    images: torch.Tensor,
    *,
    steps: int = 10,
    sampler: str = "ddim",
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    per_sample: bool = False,
    noise: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """A diffusion network (it predicts DDPM noise): denoise from Gaussian noise with
    ``"ddim"`` (deterministic, eta = 0) or ancestral ``"ddpm"`` (``steps=1000``: every
    training step) in ``steps`` network evaluations; the end state maps to probabilities as
    the flow's does. DDPM's fresh noise of every step comes from one generator per sample
    and slice, seeded from sample ``j``'s generator, so a slice's noise is the same in
    whichever batch it falls. ``noise`` (one ``(N, K, H, W)`` tensor per sample) replaces the
    starting draws; DDPM's per-step seeds are still taken from the generators after a draw of
    that shape, so passing the drawn noise gives the same result with either sampler."""
    _check_counts(steps, samples)
    if sampler not in DIFFUSION_SAMPLERS:
        raise ValueError(f"unknown diffusion sampler {sampler!r}; expected ddim or ddpm")
    field = EpsilonField(net)
    gens = [torch.Generator().manual_seed(seed + j) for j in range(samples)]
    shape = (images.shape[0], net.cfg.num_classes, *images.shape[-2:])
    if noise is None or sampler == "ddpm":
        # DDPM's seeds follow the starting draw in each generator: draw it even when given
        drawn = [torch.randn(shape, generator=g) for g in gens]
    noise = drawn if noise is None else _given_noise(noise, images, shape[1], samples)
    # ancestral DDPM draws fresh noise at every step: one seed per sample and slice
    if sampler == "ddpm":
        seeds = torch.stack([torch.randint(2**62, (images.shape[0],), generator=g) for g in gens])

    def draws(x: torch.Tensor, rows: slice) -> list[torch.Tensor]:
        cond = field.condition(x)
        out = []
        for j, z in enumerate(noise):
            x_end = z[rows].to(x.device)
            if sampler == "ddpm":
                noise_of = _per_slice(seeds[j, rows])
                end = DIFFUSION_SAMPLERS["ddpm"](field, x_end, cond, steps, noise=noise_of)
            else:
                end = DIFFUSION_SAMPLERS["ddim"](field, x_end, cond, steps)
            out.append(flow_to_probs(end.float()))
        return out

    return _batched(net, images, batch_size, per_sample, draws)


def _per_slice(seeds: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``noise(x)`` drawing row ``r`` of every step from a generator of its own, seeded with
    ``seeds[r]``: a slice's noise is the same in whichever batch it falls."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def draw(x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
        return z.to(x.device, x.dtype)

    return draw
