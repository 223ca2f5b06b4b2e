"""The learning-rate schedule and the exponential moving average of weights, shared by the
segmenter's and the synthesis flows' training loops."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "constant", "plateau")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine") -> float:
    """Linear warm-up to the peak over ``warmup_steps``, then cosine decay to zero at
    ``total_steps`` (a multiplier of the peak learning rate, for ``LambdaLR``), or with
    ``schedule="constant"`` the peak until the end (a run that may stop at any step, on a
    plateau, then stops on the schedule it trained with). ``"plateau"`` is the constant
    peak here; the training loop multiplies it down each time the validation Dice stalls."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule in ("constant", "plateau"):
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float, step: int) -> None:
    """Move ``ema``'s parameters towards ``net``'s by ``1 - decay`` and copy its buffers.

    Short runs: the decay ramps up as ``(1 + step) / (10 + step)`` until it reaches
    ``decay``, so early averages are not dominated by the random initialisation."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1.0 - d)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)
