"""Shortcut model: one network evaluation per posterior *sample* (Frans et al., 2024).

The flow's instantaneous velocity ``u(x, t)`` carries noise to masks, but one Euler step of
it from ``t = 0`` lands on ``E[x1 | image]``, the posterior *mean*: every noise draw gives
nearly the same soft mask. Integrating the ODE in many steps does reach samples of the
posterior, at many evaluations each. A shortcut model gives the network the jump size
``d`` as an input and trains it to predict the *average* velocity over a jump,

    s(x_t, t, d) ~ (x_{t+d} - x_t) / d    along the ODE's trajectory,

so ``x_{t+d} = x_t + d s(x_t, t, d)`` and one evaluation with ``d = 1`` from noise lands where
the whole ODE would: on a posterior sample. ``s(x, t, 0)`` is the instantaneous velocity and
is trained by flow matching as before; larger jumps are trained by self-consistency,

    s(x_t, t, 2e) = [s(x_t, t, e) + s(x_t + e s(x_t, t, e), t + e, e)] / 2,

the right side evaluated without gradient, with the smallest jumps ``e = 1 / M`` taken as
the instantaneous velocity. The target of ``d = 1`` is thus two half-jumps, each of those two
quarter-jumps, ...: the one-step sampler distils the M-step Euler ODE, and no term of this
objective scores the jump against the ground-truth mask (that term, at ``d = 0``, is what
makes the mean collapse the noise). Jump sizes are ``2e`` for ``e`` in
``1/M, 2/M, 4/M, ..., 1/2``, and the start time lies on the grid of multiples of ``2e``, so
``t + 2e <= 1``.

With the endpoint parameterisation the network's output is an endpoint ``x1_hat`` and
``s = (x1_hat - x_t) / (1 - t)``, so a jump to ``t = 1`` lands exactly on ``x1_hat``, a
point of the scaled simplex; the loss compares endpoints, ``x1_hat`` against
``x_t + (1 - t) s*``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medflow.flows.parameterization import logits_to_endpoint

# velocity(x, t, d) -> average velocity over a jump of size d (d = 0: instantaneous)
JumpVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_max_steps(max_steps: int) -> int:
    """``max_steps`` (the ODE steps the one-step sampler distils) must be a power of 2 >= 2."""
    if max_steps < 2 or max_steps & (max_steps - 1):
        raise ValueError(f"shortcut max_steps must be a power of 2 >= 2, got {max_steps}")
    return max_steps


@dataclass(frozen=True)
class ShortcutDraw:
    """Start times and jump sizes of the self-consistency rows of a batch.

    Attributes:
        t: ``(B,)`` start times, multiples of ``d``.
        d: ``(B,)`` jump sizes ``2e``, each in ``2/M, 4/M, ..., 1``.
    """

    t: torch.Tensor
    d: torch.Tensor


def sample_jumps(batch: int, max_steps: int, generator: torch.Generator) -> ShortcutDraw:
    """Draw ``batch`` (start time, jump) pairs on the CPU: the jump's level uniformly among
    the ``log2(M)`` levels, then the start uniformly on the jump's grid."""
    levels = check_max_steps(max_steps).bit_length() - 1  # d = 2^-k, k = 0 .. levels - 1
    k = torch.randint(levels, (batch,), generator=generator)
    d = torch.pow(2.0, -k.float())
    slots = torch.pow(2.0, k.float())  # the number of jumps of size d in [0, 1]
    t = torch.floor(torch.rand(batch, generator=generator) * slots) * d
    return ShortcutDraw(t=t, d=d)


@torch.no_grad()
def consistency_target(
    velocity: JumpVelocity, x_t: torch.Tensor, draw: ShortcutDraw, max_steps: int
) -> torch.Tensor:
    """Target average velocity ``s*`` ``(B, K, H, W)`` of jumps ``draw.d`` from ``x_t``:
    the mean of two half-jumps, each evaluated at half the size, or at size 0 (the
    instantaneous velocity) where half the size is the smallest, ``1 / max_steps``."""
    e = draw.d / 2
    e_query = torch.where(e <= 1.0 / max_steps + 1e-9, torch.zeros_like(e), e)
    ev = e.view(-1, *([1] * (x_t.ndim - 1)))
    v_a = velocity(x_t, draw.t, e_query)
    v_b = velocity(x_t + ev * v_a, draw.t + e, e_query)
    return 0.5 * (v_a + v_b)


def shortcut_loss(
    logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, target_velocity: torch.Tensor
) -> torch.Tensor:
    """Mean squared endpoint error of endpoint logits ``(B, K, H, W)`` against the endpoint
    the target average velocity implies, ``x_t + (1 - t) s*``."""
    gap = (1.0 - t).view(-1, *([1] * (x_t.ndim - 1)))
    target = x_t + gap * target_velocity
    return (logits_to_endpoint(logits) - target.float()).pow(2).mean()
