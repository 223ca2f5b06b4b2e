"""Integrators for ``dx/dt = velocity(x, t, cond)`` from noise (t=0) to data (t=1).

A sampler only integrates: it knows nothing of models, masks or images. ``velocity`` is any
callable ``(x, t, cond) -> dx/dt`` with ``t`` of shape ``(B,)``; ``cond`` is passed unchanged
to every evaluation of one integration (a field may keep per-trajectory state in it, as a
self-conditioned :class:`~medflow.flows.parameterization.FlowField` keeps its last estimate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.utils.checkpoint

Velocity = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


class Sampler(Protocol):
    """What every sampler here and in :mod:`medflow.flows.diffusion` is: noise in, data out,
    in ``steps`` steps of ``field`` (``flows/__init__`` states the conventions)."""

    def __call__(
        self, field: Any, x: torch.Tensor, cond: Any = None, steps: int = 1
    ) -> torch.Tensor: ...


def _times(steps: int, device: torch.device) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(0.0, 1.0, steps + 1, device=device)


@torch.no_grad()
def euler(velocity: Velocity, x0: torch.Tensor, cond: Any = None, steps: int = 1) -> torch.Tensor:
    """Explicit Euler with ``steps`` uniform steps; ``steps`` network evaluations."""
    return _euler_loop(velocity, x0, cond, _times(steps, x0.device), checkpoint=False, on_step=None)


DEFAULT_REFINE_START = 0.5


@torch.no_grad()
def refine(
    velocity: Velocity,
    x0: torch.Tensor,
    cond: Any = None,
    steps: int = 1,
    *,
    start: float = DEFAULT_REFINE_START,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Refine the one-step estimate: ``x1_hat = x0 + velocity(x0, 0)`` (one evaluation, the
    whole of ``steps=1``), re-noised to ``t = start`` as ``x = (1 - start) z + start x1_hat``,
    then ``steps - 1`` uniform Euler steps from ``start`` to 1; ``steps`` evaluations.

    ``z`` is ``noise`` (fresh noise, ``x0``'s shape) or, when None, ``x0`` itself. With
    ``x0`` the re-noised state is exactly where one Euler step from 0 to ``start`` lands, so
    the sampler is Euler on the grid ``0, start, ..., 1``: plain Euler with ``n`` steps is
    the case ``start = 1 / n`` (its first step already re-noises the one-step estimate),
    and ``start`` moves that point to where the network is trained to correct a visible
    mask. ``start = 1`` returns the one-step estimate.
    """
    if not 0.0 < start <= 1.0:
        raise ValueError(f"refine start must be in (0, 1], got {start}")
    if noise is not None and noise.shape != x0.shape:
        raise ValueError(f"noise must have shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    ts = _times(steps, x0.device)  # checks steps
    x1_hat = x0 + velocity(x0, ts[0].expand(x0.shape[0]), cond)
    if steps == 1:
        return x1_hat
    z = x0 if noise is None else noise.to(x0)
    x = (1.0 - start) * z + start * x1_hat
    ts = torch.linspace(start, 1.0, steps, device=x0.device)
    return _euler_loop(velocity, x, cond, ts, checkpoint=False, on_step=None)


@torch.no_grad()
def heun(velocity: Velocity, x0: torch.Tensor, cond: Any = None, steps: int = 1) -> torch.Tensor:
    """Heun's second-order method; the last step is an Euler step because the velocity at
    ``t = 1`` is undefined for endpoint-parameterised models. ``2 * steps - 1`` evaluations."""
    ts = _times(steps, x0.device)
    x = x0
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = velocity(x, t.expand(x.shape[0]), cond)
        x_euler = x + dt * v
        if i == steps - 1:
            x = x_euler
        else:
            v_next = velocity(x_euler, t_next.expand(x.shape[0]), cond)
            x = x + dt * 0.5 * (v + v_next)
    return x


@torch.no_grad()
def one_step(velocity: Velocity, x0: torch.Tensor, cond: Any = None) -> torch.Tensor:
    """One network evaluation: ``x1 = x0 + velocity(x0, 0, cond)``; the default for inference."""
    return euler(velocity, x0, cond, steps=1)


def euler_with_grad(
    velocity: Velocity,
    x0: torch.Tensor,
    cond: Any = None,
    steps: int = 1,
    checkpoint: bool = True,
    on_step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    *,
    start: float = 0.0,
) -> torch.Tensor:
    """Euler like :func:`euler`, but differentiable: gradients of the result reach the
    velocity's parameters through every step (reward fine-tuning back-propagates through the
    sampler). ``x0`` is the state at ``t = start`` (0: noise), integrated to 1 in ``steps``
    uniform steps, so a translation from ``start > 0`` back-propagates through those only.
    With ``checkpoint`` each step's activations are recomputed in the backward pass
    instead of stored, so memory grows with the state, not with ``steps`` network graphs.
    ``on_step(x, t, v)``, if given, sees every state, time and velocity (with their graph).
    A field that keeps state in ``cond`` (a self-conditioned ``FlowField``) needs
    ``checkpoint=False``: the backward pass would recompute a step from the later state.
    """
    if not 0.0 <= start < 1.0:
        raise ValueError(f"start must be in [0, 1), got {start}")
    ts = _times(steps, x0.device)
    if start:
        ts = torch.linspace(start, 1.0, steps + 1, device=x0.device)
    return _euler_loop(velocity, x0, cond, ts, checkpoint=checkpoint, on_step=on_step)


def _euler_loop(
    velocity: Velocity,
    x0: torch.Tensor,
    cond: Any,
    ts: torch.Tensor,
    *,
    checkpoint: bool,
    on_step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None,
) -> torch.Tensor:
    """The one Euler loop of :func:`euler` (under no_grad), :func:`refine` and
    :func:`euler_with_grad`, over the time grid ``ts`` (one evaluation per interval)."""
    x = x0
    for i in range(ts.shape[0] - 1):
        t, dt = ts[i].expand(x.shape[0]), ts[i + 1] - ts[i]
        if checkpoint and torch.is_grad_enabled():
            v = torch.utils.checkpoint.checkpoint(velocity, x, t, cond, use_reentrant=False)
        else:
            v = velocity(x, t, cond)
        if on_step is not None:
            on_step(x, t, v)
        x = x + dt * v
    return x


SAMPLERS: dict[str, Sampler] = {"euler": euler, "heun": heun}
