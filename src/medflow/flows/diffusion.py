"""DDPM noise prediction for masks: the MedSegDiff-style diffusion baseline.

Diffusion keeps DDPM's own conventions, which differ from the flow's (``flows/__init__``):

* Steps ``i = 0 .. T-1`` (``T = 1000``), ``i = 0`` nearly data and ``i = T-1`` nearly noise;
  ``i = -1`` stands for the data itself (``alpha_bar = 1``).
* ``x_start`` is the clean mask, encoded by :func:`~medflow.flows.encoding.mask_to_flow`
  (DDPM's ``x_0``; the flow's ``x0`` is noise, hence the other name).
* Forward process ``x_i = sqrt(abar_i) x_start + sqrt(1 - abar_i) eps`` with linear betas
  1e-4 .. 0.02 (DDPM, and MedSegDiff's published configuration).
* An epsilon model is called as ``eps_model(x_i, i, cond)`` with ``i`` a long tensor ``(B,)``;
  :class:`EpsilonField` maps a :class:`~medflow.models.unet.SegNet` onto this call with
  ``t = i / T`` (the net scales ``t`` by 1000, so its embedding sees DDPM's integer step).

The samplers only integrate: they know nothing of networks, masks or images.
docs/MODEL.md section 8 gives the equations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medflow.flows.parameterization import Conditioning
from medflow.flows.samplers import Sampler

NUM_TRAIN_STEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
# the value of ``TrainConfig.parameterization`` for a network that predicts the noise
EPSILON = "epsilon"

EpsModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class DiffusionSchedule:
    """Noise levels of the forward process.

    Attributes:
        betas: ``(T,)`` float64 variances of the single steps.
    """

    betas: torch.Tensor

    @classmethod
    def linear(
        cls,
        num_steps: int = NUM_TRAIN_STEPS,
        beta_start: float = BETA_START,
        beta_end: float = BETA_END,
    ) -> DiffusionSchedule:
        """DDPM's schedule: betas evenly spaced from ``beta_start`` to ``beta_end``."""
        if num_steps < 1 or not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(
                f"need num_steps >= 1 and 0 < beta_start <= beta_end < 1, got "
                f"{num_steps}, {beta_start}, {beta_end}"
            )
        return cls(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_bar(self) -> torch.Tensor:
        """``(T,)`` float64 ``abar_i = prod_{j <= i} (1 - beta_j)``."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    def alpha_bar(self, i: int) -> float:
        """``abar_i`` for one step; ``i = -1`` is the data, ``abar = 1``."""
        if not -1 <= i < self.num_steps:
            raise ValueError(f"step must be in [-1, {self.num_steps - 1}], got {i}")
        return 1.0 if i < 0 else float(self.alphas_bar[i])


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64 values as ``(B, 1, 1, 1)`` in ``like``'s dtype and device."""
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


def q_sample(
    x_start: torch.Tensor, i: torch.Tensor, eps: torch.Tensor, schedule: DiffusionSchedule
) -> torch.Tensor:
    """``x_i = sqrt(abar_i) x_start + sqrt(1 - abar_i) eps`` for steps ``i`` of shape ``(B,)``."""
    if i.ndim != 1 or i.shape[0] != x_start.shape[0]:
        raise ValueError(f"i must have shape ({x_start.shape[0]},), got {tuple(i.shape)}")
    abar = schedule.alphas_bar[i.cpu()]
    return _per_sample(abar.sqrt(), x_start) * x_start + _per_sample((1 - abar).sqrt(), eps) * eps


def start_from_eps(
    x_t: torch.Tensor, i: int, eps: torch.Tensor, schedule: DiffusionSchedule, clip: bool = True
) -> torch.Tensor:
    """Invert :func:`q_sample` at step ``i``: ``(x_i - sqrt(1 - abar_i) eps) / sqrt(abar_i)``,
    clipped to the mask range [-1, 1] unless ``clip`` is False."""
    abar = schedule.alpha_bar(i)
    x_start = (x_t - (1.0 - abar) ** 0.5 * eps) / abar**0.5
    return x_start.clamp(-1.0, 1.0) if clip else x_start


def eps_from_start(
    x_t: torch.Tensor, i: int, x_start: torch.Tensor, schedule: DiffusionSchedule
) -> torch.Tensor:
    """The noise that takes ``x_start`` to ``x_t`` at step ``i >= 0``."""
    abar = schedule.alpha_bar(i)
    return (x_t - abar**0.5 * x_start) / (1.0 - abar) ** 0.5


def ddim_step(
    x_t: torch.Tensor, eps: torch.Tensor, i: int, s: int, schedule: DiffusionSchedule
) -> torch.Tensor:
    """Deterministic DDIM step (eta = 0) from step ``i`` to an earlier step ``s`` (-1: data).

    ``x_start`` is estimated from ``eps`` and clipped to [-1, 1]; the noise is then recomputed
    from the clipped estimate, so the step stays on the line through ``x_start`` and ``x_t``:
    ``x_s = sqrt(abar_s) x_start + sqrt(1 - abar_s) eps'``.
    """
    if not -1 <= s < i:
        raise ValueError(f"need -1 <= s < i, got i={i}, s={s}")
    x_start = start_from_eps(x_t, i, eps, schedule)
    abar_s = schedule.alpha_bar(s)
    if s < 0:
        return x_start
    eps = eps_from_start(x_t, i, x_start, schedule)
    return abar_s**0.5 * x_start + (1.0 - abar_s) ** 0.5 * eps


def ddpm_posterior(
    x_t: torch.Tensor, x_start: torch.Tensor, i: int, s: int, schedule: DiffusionSchedule
) -> tuple[torch.Tensor, float]:
    """Mean and variance of ``q(x_s | x_i, x_start)`` for ``s < i``.

    With ``beta' = 1 - abar_i / abar_s`` (``beta_i`` when ``s = i - 1``):
    ``mean = sqrt(abar_s) beta' / (1 - abar_i) x_start
    + sqrt(1 - beta') (1 - abar_s) / (1 - abar_i) x_i`` and
    ``var = beta' (1 - abar_s) / (1 - abar_i)``; a strided ``s`` is DDPM on the respaced
    schedule (Nichol & Dhariwal 2021).
    """
    if not -1 <= s < i:
        raise ValueError(f"need -1 <= s < i, got i={i}, s={s}")
    abar_i, abar_s = schedule.alpha_bar(i), schedule.alpha_bar(s)
    beta = 1.0 - abar_i / abar_s
    c_start = abar_s**0.5 * beta / (1.0 - abar_i)
    c_t = (1.0 - beta) ** 0.5 * (1.0 - abar_s) / (1.0 - abar_i)
    return c_start * x_start + c_t * x_t, beta * (1.0 - abar_s) / (1.0 - abar_i)


def ddpm_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    i: int,
    s: int,
    schedule: DiffusionSchedule,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Ancestral step ``x_s = mean + sqrt(var) z`` of :func:`ddpm_posterior`, with ``x_start``
    estimated from ``eps`` and clipped; ``noise`` is ``z`` (unused at the last step, ``s = -1``,
    whose variance is 0)."""
    mean, var = ddpm_posterior(x_t, start_from_eps(x_t, i, eps, schedule), i, s, schedule)
    return mean if s < 0 else mean + var**0.5 * noise


def sampling_steps(steps: int, num_train_steps: int = NUM_TRAIN_STEPS) -> list[int]:
    """``steps`` training steps to visit, descending from ``T - 1`` ("trailing" spacing:
    sampling starts where the prior ``N(0, I)`` holds); ``steps = T`` visits every step."""
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be in [1, {num_train_steps}], got {steps}")
    return [num_train_steps - 1 - (k * num_train_steps) // steps for k in range(steps)]


def _sample(
    eps_model: EpsModel,
    x_end: torch.Tensor,
    cond: Any,
    steps: int,
    schedule: DiffusionSchedule,
    update: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor],
) -> torch.Tensor:
    visit = sampling_steps(steps, schedule.num_steps)
    x = x_end
    for i, s in zip(visit, [*visit[1:], -1]):
        eps = eps_model(x, torch.full((x.shape[0],), i, dtype=torch.long, device=x.device), cond)
        x = update(x, eps.to(x.dtype), i, s)
    return x


@torch.no_grad()
def ddim(
    eps_model: EpsModel,
    x_end: torch.Tensor,
    cond: Any = None,
    steps: int = 10,
    schedule: DiffusionSchedule | None = None,
) -> torch.Tensor:
    """DDIM (eta = 0) from noise ``x_end`` at step ``T - 1`` to a clipped mask estimate;
    ``steps`` network evaluations."""
    schedule = schedule or DiffusionSchedule.linear()
    return _sample(
        eps_model, x_end, cond, steps, schedule, lambda x, e, i, s: ddim_step(x, e, i, s, schedule)
    )


@torch.no_grad()
def ddpm(
    eps_model: EpsModel,
    x_end: torch.Tensor,
    cond: Any = None,
    steps: int = NUM_TRAIN_STEPS,
    schedule: DiffusionSchedule | None = None,
    noise: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
) -> torch.Tensor:
    """Ancestral DDPM from noise ``x_end``; ``steps = T`` is the original sampler, fewer
    steps sample the respaced schedule. ``noise(x)`` draws the fresh noise of each step
    (shaped like ``x``); ``steps`` network evaluations."""
    schedule = schedule or DiffusionSchedule.linear()
    return _sample(
        eps_model,
        x_end,
        cond,
        steps,
        schedule,
        lambda x, e, i, s: ddpm_step(x, e, i, s, schedule, noise(x) if s >= 0 else x),
    )


# the same interface as the flow samplers (medflow.flows.samplers.Sampler)
DIFFUSION_SAMPLERS: dict[str, Sampler] = {"ddim": ddim, "ddpm": ddpm}


def network_time(i: torch.Tensor, num_train_steps: int = NUM_TRAIN_STEPS) -> torch.Tensor:
    """The continuous time a :class:`~medflow.models.unet.SegNet` reads for step ``i``:
    ``i / T`` (its embedding multiplies by 1000, recovering DDPM's integer step)."""
    return i.float() / num_train_steps


class EpsilonField:
    """``eps_model(x_i, i, cond)`` for a :class:`~medflow.models.unet.SegNet` in flow mode
    trained to predict the noise (``TrainConfig(model="diffusion")``)."""

    def __init__(self, net: nn.Module, num_train_steps: int = NUM_TRAIN_STEPS) -> None:
        self.net = net
        self.num_train_steps = num_train_steps

    def condition(self, image: torch.Tensor) -> Conditioning:
        """Compute the image-branch features once for all steps of a sampler."""
        feats = self.net.image_features(image) if hasattr(self.net, "image_features") else None
        return Conditioning(image, feats)

    def __call__(self, x: torch.Tensor, i: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        t = network_time(i, self.num_train_steps)
        return self.net(x, t, cond.image, feats=cond.feats)
