"""A plan (:mod:`medflow.data.plan`) applied to a training run: what ``--plan`` changes.

The plan decides where the data set decides — slice axis, in-plane spacing, patch, batch,
network depth, patch sampling — and the training config keeps what the machine decides: the
widths (``channels``: its first width, doubling per level, at most its last; a CPU run
keeps medflow's narrow defaults where nnU-Net's plan would take 32 to 512), the optimiser,
the steps. docs/PLANNING.md states the rules.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from medflow.data.fingerprint import fingerprint_dataset
from medflow.data.layout import DatasetSpec
from medflow.data.plan import Plan, plan_from_fingerprint, read_plan
from medflow.segmentation.config import TrainConfig

PLANS = "plans.json"  # the plan a run used, in its folder (and in every checkpoint)


def widths(cfg: TrainConfig, levels: int) -> tuple[int, ...]:
    """``levels`` widths from ``cfg.channels``: its first, doubling, capped at its last."""
    base, cap = cfg.channels[0], max(cfg.channels)
    return tuple(min(base * 2**i, cap) for i in range(levels))


def apply_plan(cfg: TrainConfig, plan: Plan) -> TrainConfig:
    """``cfg`` with the planned fields replaced (``plan`` stays what it was)."""
    return dataclasses.replace(
        cfg,
        slice_axis=plan.slice_axis,
        patch=tuple(plan.patch_size),
        batch_size=plan.batch_size,
        channels=widths(cfg, plan.levels),
        foreground_fraction=plan.foreground_fraction,
        class_balanced=plan.class_balanced,
        context_slices=plan.context_slices,
    )


def compute_kind(device: torch.device) -> str:
    """The plan's ``compute`` for a device: ``"cpu"`` on a CPU, else ``"gpu"``."""
    return "cpu" if device.type == "cpu" else "gpu"


def resolve_plan(
    cfg: TrainConfig, spec: DatasetSpec, compute: str = "gpu"
) -> tuple[TrainConfig, Plan | None]:
    """The config a run trains with and its plan: none for ``plan="none"``, the training
    data's own for ``"auto"`` (planned for ``compute``, the machine it will train on), else
    the ``plans.json`` at ``cfg.plan``.

    Raises:
        DataError: an unreadable plan file, or a dataset the fingerprint cannot read.
    """
    if cfg.plan == "none":
        return cfg, None
    if cfg.plan == "auto":
        plan = plan_from_fingerprint(fingerprint_dataset(spec), compute=compute)
    else:
        plan = read_plan(Path(cfg.plan))
    return apply_plan(cfg, plan), plan
