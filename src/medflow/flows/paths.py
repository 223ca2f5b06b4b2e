"""The straight probability path and the distribution of training times."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PathSample:
    """A point on the path and the velocity the model must match there.

    Attributes:
        x_t: ``(B, C, H, W)`` state at time ``t``.
        dx_t: ``(B, C, H, W)`` target velocity ``d x_t / d t``.
        t: ``(B,)`` times.
    """

    x_t: torch.Tensor
    dx_t: torch.Tensor
    t: torch.Tensor


class LinearPath:
    """Conditional optimal-transport path ``x_t = (1 - t) x0 + t x1``, velocity ``x1 - x0``."""

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> PathSample:
        """Corrupt data ``x1`` towards noise ``x0`` at times ``t`` of shape ``(B,)``."""
        if t.ndim != 1 or t.shape[0] != x1.shape[0]:
            raise ValueError(f"t must have shape ({x1.shape[0]},), got {tuple(t.shape)}")
        tt = t.view(-1, *([1] * (x1.ndim - 1)))
        return PathSample(x_t=(1.0 - tt) * x0 + tt * x1, dx_t=x1 - x0, t=t)

    @staticmethod
    def velocity_from_endpoint(
        x1_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, min_gap: float
    ) -> torch.Tensor:
        """Velocity implied by a predicted endpoint: ``(x1_hat - x_t) / (1 - t)``.

        On this path ``E[x1 - x0 | x_t] = (E[x1 | x_t] - x_t) / (1 - t)``, so a model that
        predicts the endpoint defines the same marginal velocity field. ``1 - t`` is floored at
        ``min_gap`` because the ratio is unbounded as ``t -> 1``.
        """
        gap = (1.0 - t).clamp_min(min_gap).view(-1, *([1] * (x_t.ndim - 1)))
        return (x1_hat - x_t) / gap


def sample_time(
    batch: int,
    schedule: str,
    *,
    loc: float = 0.0,
    scale: float = 1.0,
    zero_fraction: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw training times ``(B,)`` in [0, 1) on the CPU.

    Args:
        batch: number of times.
        schedule: ``"uniform"`` or ``"logit_normal"`` (``sigmoid(N(loc, scale^2))``, as in
            Stable Diffusion 3; a negative ``loc`` puts more weight near the noise end).
        loc: mean of the normal before the sigmoid.
        scale: its standard deviation.
        zero_fraction: probability of ``t = 0`` exactly, the point where one-step inference
            evaluates the network. Every time distribution with full support has the same
            minimiser; this one spends capacity where the default prediction is made.
        generator: torch RNG for reproducibility.
    """
    if not 0.0 <= zero_fraction <= 1.0:
        raise ValueError(f"zero_fraction must be in [0, 1], got {zero_fraction}")
    if schedule == "uniform":
        t = torch.rand(batch, generator=generator)
    elif schedule == "logit_normal":
        t = torch.sigmoid(torch.randn(batch, generator=generator) * scale + loc)
    else:
        raise ValueError(
            f"unknown time schedule {schedule!r}; expected 'uniform' or 'logit_normal'"
        )
    zero = torch.rand(batch, generator=generator) < zero_fraction
    return torch.where(zero, torch.zeros_like(t), t)
