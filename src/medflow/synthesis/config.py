"""Configuration of ``medflow synth train`` (stage 1) and ``medflow synth align`` (stage 2).

One frozen dataclass per entry point with CPU-sized defaults; each is stored in the
checkpoint it produces.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def _check(checks: list[tuple[bool, str]], obj: object) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{message} (got {obj})")


def _from_dict(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}")
    d = dict(d)
    for key in ("mask_channels", "image_channels"):
        if key in d:
            d[key] = tuple(d[key])
    return cls(**d)


@dataclass(frozen=True)
class SynthConfig:
    """Hyperparameters of stage 1: a mask flow and a mask-conditioned image flow trained on
    the labelled source data.

    Attributes:
        size: slices are resized to ``size x size`` (as ``medflow train`` does).
        slice_axis: spatial axis to slice along; None picks it as ``medflow train`` does.
        mask_channels: width per resolution level of the mask flow's network.
        image_channels: width per resolution level of the image flow's network.
        steps: optimiser steps (each trains both flows on one batch).
        batch_size: slices per step.
        lr: peak AdamW learning rate (linear warm-up, cosine decay).
        warmup_steps: warm-up steps.
        ema_decay: decay of the weights' moving average; the average is what is saved.
        class_dropout: probability of training the mask flow without its class condition,
            so that one network samples both unconditionally and class-conditioned.
        hflip: mirror slices along their first in-plane axis at random (left-right in
            RAS-oriented NIfTI; off for data whose first axis has no mirror symmetry).
        sample_steps: Euler steps used by ``sample`` and stored as its default.
        seed: seeds initialisation, data order, noise and times.
        threads: intra-op threads on CPU; None uses every core.
    """

    size: int = 64
    slice_axis: int | None = None
    mask_channels: tuple[int, ...] = (16, 32, 64, 128)
    image_channels: tuple[int, ...] = (16, 32, 64, 128)
    steps: int = 1200
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    class_dropout: float = 0.2
    hflip: bool = True
    sample_steps: int = 20
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask_channels", tuple(int(c) for c in self.mask_channels))
        object.__setattr__(self, "image_channels", tuple(int(c) for c in self.image_channels))
        multiple = 2 ** (max(len(self.mask_channels), len(self.image_channels)) - 1)
        _check(
            [
                (
                    self.size >= 8 and self.size % multiple == 0,
                    f"size must be a multiple of {multiple} and >= 8",
                ),
                (self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1"),
                (self.lr > 0, "lr must be positive"),
                (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
                (0.0 <= self.class_dropout <= 1.0, "class_dropout must be in [0, 1]"),
                (self.sample_steps >= 1, "sample_steps must be >= 1"),
                (self.slice_axis in (None, 0, 1, 2), "slice_axis must be 0, 1 or 2"),
            ],
            self,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SynthConfig:
        return _from_dict(cls, d)


@dataclass(frozen=True)
class AlignConfig:
    """Hyperparameters of stage 2: reward fine-tuning of the image flow towards K unlabelled
    reference images of the target site.

    Attributes:
        k: use the first ``k`` reference files (sorted by name); None uses all.
        steps: optimiser steps.
        batch_size: images generated per step.
        sampler_steps: Euler steps of the sampler the reward is back-propagated through.
        lr: AdamW learning rate (constant after a short warm-up).
        reg_weight: weight of the regulariser that keeps the velocity field near stage 1's
            on the states the sampler visits.
        encoder_seed: seed of the frozen random feature encoder of the reward.
        checkpointing: recompute each sampler step in the backward pass (gradient
            checkpointing) instead of storing its activations.
        seed: seeds masks, noise and the choice of source images for feature scaling.
        threads: intra-op threads on CPU; None uses every core.
    """

    k: int | None = None
    steps: int = 100
    batch_size: int = 8
    sampler_steps: int = 4
    lr: float = 1e-3
    reg_weight: float = 1.0
    encoder_seed: int = 0
    checkpointing: bool = True
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        _check(
            [
                (self.k is None or self.k >= 1, "k must be >= 1"),
                (self.steps >= 1 and self.batch_size >= 2, "steps >= 1 and batch_size >= 2"),
                (self.sampler_steps >= 1, "sampler_steps must be >= 1"),
                (self.lr > 0, "lr must be positive"),
                (self.reg_weight >= 0, "reg_weight must be >= 0"),
            ],
            self,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AlignConfig:
        return _from_dict(cls, d)
