"""Soft predictions for batches of slices, shared by validation and ``medflow predict``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from medflow.engine.runtime import autocast
from medflow.errors import OptionError
from medflow.flows.diffusion import (
    DIFFUSION_SAMPLERS,
    EPSILON,
    NUM_TRAIN_STEPS,
    EpsilonField,
    ddim,
    ddpm,
)
from medflow.flows.encoding import flow_to_probs
from medflow.flows.parameterization import FlowField
from medflow.flows.samplers import SAMPLERS, euler
from medflow.models.unet import SegNet

SHORTCUT = "shortcut"  # one jump-averaged Euler step per 1/steps: a posterior sample


@torch.no_grad()
def predict_probs(
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
) -> torch.Tensor:
    """Class probabilities ``(N, K, H, W)`` (float32, on CPU) for slices ``(N, C, H, W)``;
    with ``per_sample`` each sample's own, ``(S, N, K, H, W)``, not averaged (a plain UNet
    has no noise and gives ``S = 1``).

    A flow network integrates from Gaussian noise with ``sampler`` (``"euler"`` or ``"heun"``)
    for ``steps`` steps (one Euler step, one network evaluation, by default): from the same
    noise, one step lands on the posterior mean. ``"shortcut"`` (a network trained with
    shortcut jumps, ``net.cfg.step_input``) takes ``steps`` jumps of size ``1 / steps``:
    one evaluation per posterior *sample* (:mod:`medflow.flows.shortcut`). Its ``steps``
    must be a power of 2; from the model's ``shortcut_max_steps`` on, jumps that small were
    never trained and the sampler takes Euler steps of the instantaneous field instead (the
    ODE the jumps distil). A diffusion
    network (``parameterization="epsilon"``) denoises from Gaussian noise with ``"ddim"``
    (deterministic, eta = 0) or ancestral ``"ddpm"`` (``steps=1000``: every training step) in
    ``steps`` network evaluations. Either way the end state ``x`` maps to probabilities as
    ``(x + 1) / 2``, clipped at 0 and renormalised, and with ``samples > 1`` the probabilities
    reached from independent noise draws are averaged. A plain UNet is one softmax.
    Noise comes from a CPU generator seeded with ``seed`` (DDPM's fresh noise of every step
    from one generator per slice, seeded from it), so results do not depend on the device or
    on ``batch_size``.

    Raises:
        OptionError: ``sampler`` does not fit the model (``ddim``/``ddpm`` for a flow network
            or UNet, anything else for a diffusion network), or too many diffusion steps.
    """
    diffusion = parameterization == EPSILON
    _check_sampling(net, sampler, steps, samples, diffusion)
    device = next(net.parameters()).device
    k = net.cfg.num_classes
    was_training = net.training
    net.eval()
    # sample j's noise comes from a generator of its own seeded with seed + j, drawn for the
    # whole set before batching: an ensemble of S samples is exactly the mean of S one-sample
    # calls with seeds seed ... seed + S - 1, whatever the batch size
    gens = [torch.Generator().manual_seed(seed + j) for j in range(samples)]
    noise = [
        torch.randn(images.shape[0], k, *images.shape[-2:], generator=g)
        for g in (gens if net.cfg.flow else [])
    ]
    # ancestral DDPM draws fresh noise at every step: one seed per sample and slice
    if diffusion and sampler == "ddpm":
        seeds = torch.stack([torch.randint(2**62, (images.shape[0],), generator=g) for g in gens])
    if diffusion:
        field = EpsilonField(net)
    else:
        jump = 1.0 / steps if sampler == SHORTCUT and steps < shortcut_max_steps else None
        field = FlowField(net, parameterization, min_gap, step=jump)
    # a plain UNet is deterministic unless it has dropout and more than one sample is asked
    # for (Monte-Carlo dropout); one sample (validation, a plain predict) runs it as trained
    mc_dropout = samples > 1 and any(isinstance(m, torch.nn.Dropout) for m in net.modules())
    unet_draws = samples if mc_dropout else 1
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        rows = slice(start, start + x.shape[0])
        with autocast(device):
            if not net.cfg.flow:
                draws = [_unet_draw(net, x, seed + j, start, mc_dropout) for j in range(unet_draws)]
            else:
                cond = field.condition(x)  # once per batch, shared by every sample
                draws = []
                for j, z in enumerate(noise):
                    x_end = z[rows].to(device)
                    if not diffusion:
                        # shortcut jumps are Euler steps of the jump-averaged velocity
                        end = SAMPLERS.get(sampler, euler)(field, x_end, cond, steps)
                    elif sampler == "ddpm":
                        end = ddpm(field, x_end, cond, steps, noise=_per_slice(seeds[j, rows]))
                    else:
                        end = ddim(field, x_end, cond, steps)
                    draws.append(flow_to_probs(end.float()).cpu())
        if per_sample:
            out.append(torch.stack([d.float().cpu() for d in draws]))
        else:
            out.append((sum(draws) / len(draws)).float().cpu())
    net.train(was_training)
    return torch.cat(out, dim=1 if per_sample else 0)


def _unet_draw(
    net: SegNet, x: torch.Tensor, seed: int, start: int, mc_dropout: bool
) -> torch.Tensor:
    """Softmax of a plain UNet; with ``mc_dropout`` (the Monte-Carlo dropout baseline) one
    draw of its dropout masks, seeded by ``seed`` and the batch's first row (so a draw does
    not depend on the other samples, but does on the batch size and the device)."""
    dropouts = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    if not (mc_dropout and dropouts):
        return torch.softmax(net(x).float(), dim=1)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed * 1_000_003 + start)
        for m in dropouts:
            m.train()
        try:
            return torch.softmax(net(x).float(), dim=1)
        finally:
            for m in dropouts:
                m.eval()


def _check_sampling(net: SegNet, sampler: str, steps: int, samples: int, diffusion: bool) -> None:
    if steps < 1 or samples < 1:
        raise ValueError(f"steps and samples must be >= 1, got {steps} and {samples}")
    if diffusion:
        if sampler not in DIFFUSION_SAMPLERS:
            raise OptionError(
                f"sampler {sampler!r} does not fit a diffusion model (it predicts noise); use "
                "'ddim' (steps 10 or 50) or 'ddpm' (steps 1000)"
            )
        if steps > NUM_TRAIN_STEPS:
            raise OptionError(
                f"steps {steps}: a diffusion model has {NUM_TRAIN_STEPS} steps to sample"
            )
    elif sampler == SHORTCUT:
        if not getattr(net.cfg, "step_input", False):
            raise OptionError(
                "sampler 'shortcut' needs a model trained with shortcut jumps "
                "(medflow train --shortcut-fraction > 0); this model takes "
                f"{' or '.join(repr(s) for s in SAMPLERS)}"
            )
        if steps & (steps - 1):
            raise OptionError(
                f"steps {steps}: the shortcut sampler takes jumps of trained sizes, so steps "
                "must be a power of 2 (1, 2, 4, ...)"
            )
    elif sampler in DIFFUSION_SAMPLERS:
        kind = "flow" if net.cfg.flow else "UNet"
        raise OptionError(
            f"sampler {sampler!r} is for diffusion models; this {kind} model takes "
            f"{' or '.join(repr(s) for s in SAMPLERS)}"
        )
    elif sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")


def _per_slice(seeds: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``noise(x)`` drawing row ``r`` of every step from a generator of its own, seeded with
    ``seeds[r]``: a slice's noise is the same in whichever batch it falls."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def draw(x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
        return z.to(x.device, x.dtype)

    return draw
