"""Configuration of ``medflow synth train`` (stage 1) and ``medflow synth align`` (stage 2).

One frozen dataclass per entry point with CPU-sized defaults; each is stored in the
checkpoint it produces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

# the feature groups the reward's encoder (medflow.synthesis.reward.FeatureEncoder) computes
# on its own, named here so that the CLI and stored configs are checked without importing torch
REWARD_FEATURES = ("moments", "histogram", "style", "fine_histogram", "laplacian", "lowfreq")
# the encoder's features before the groups could be chosen, in the same order: the default
DEFAULT_REWARD_FEATURES = ("moments", "histogram", "style")
# groups computed from a frozen module handed to the encoder (FeatureEncoder's extractor):
# the source segmenter's early features. Kept out of REWARD_FEATURES, the groups a config
# may name, because ``synth align`` has no way to pass the module yet: a config naming
# "segmenter" would fail only after loading the models
EXTRACTOR_FEATURES = ("segmenter",)


def check_reward_features(names: object, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """``names`` (a sequence of group names, or one string of comma-separated names, as a
    ``--set align.reward_features=laplacian,lowfreq`` override gives it) as a tuple, checked
    against :data:`REWARD_FEATURES` and the ``extra`` names the caller can compute
    (:data:`EXTRACTOR_FEATURES` for the encoder itself).

    Raises:
        ValueError: no name, an unknown name or a name given twice.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    names = tuple(str(n) for n in names)
    known = (*REWARD_FEATURES, *extra)
    unknown = [n for n in names if n not in known]
    if not names or unknown or len(set(names)) < len(names):
        raise ValueError(
            f"reward_features {list(names)}: name each group once, from {', '.join(known)}"
        )
    return names


def _check(checks: list[tuple[bool, str]], obj: object) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{message} (got {obj})")


# the mask flow's state encodings (medflow.flows.encoding): one-hot or signed distance
MASK_ENCODINGS = ("onehot", "sdf")
# what a stored stage-1 config that lacks these fields was trained with
SYNTH_PRE_FIELD_DEFAULTS = {"separate_optimisers": False}


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
        steps: optimiser steps (each trains both flows on one batch; with
            separate_optimisers, the image flow's steps).
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
        separate_optimisers: give each flow its own AdamW, schedule, gradient clip and
            stream of batches and noise, so the image loss no longer scales the mask flow's
            step through one clip norm over both; off: one optimiser, as before.
        mask_lr: the mask flow's peak learning rate (needs separate_optimisers); None: lr.
        mask_steps: the mask flow's optimiser steps (needs separate_optimisers); beyond
            ``steps`` it trains alone; None: steps.
        position_condition: condition the mask flow on each slice's position along the
            slice axis (0..1 over the training slices' world-coordinate range); samples
            then take positions drawn from the training slices' unless given.
        mask_encoding: the mask flow's state: "onehot" (scaled to [-1, 1]) or "sdf"
            (per-class signed distance squashed by tanh); both decode by argmax.
        mask_sdf_width: width in pixels of the "sdf" encoding's tanh.
        mask_postprocess: clean sampled masks: drop foreground components smaller than
            mask_min_component pixels, fill holes smaller than mask_max_hole pixels.
        mask_min_component: smallest foreground component kept by mask_postprocess.
        mask_max_hole: holes smaller than this are filled by mask_postprocess.
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
    separate_optimisers: bool = False
    mask_lr: float | None = None
    mask_steps: int | None = None
    position_condition: bool = False
    mask_encoding: str = "onehot"
    mask_sdf_width: float = 4.0
    mask_postprocess: bool = False
    mask_min_component: int = 8
    mask_max_hole: int = 8

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
                (self.mask_lr is None or self.mask_lr > 0, "mask_lr must be positive"),
                (self.mask_steps is None or self.mask_steps >= 1, "mask_steps must be >= 1"),
                (
                    self.separate_optimisers or (self.mask_lr, self.mask_steps) == (None, None),
                    "mask_lr and mask_steps need separate_optimisers",
                ),
                (self.mask_encoding in MASK_ENCODINGS, f"mask_encoding must be {MASK_ENCODINGS}"),
                (self.mask_sdf_width > 0, "mask_sdf_width must be positive"),
                (
                    self.mask_min_component >= 0 and self.mask_max_hole >= 0,
                    "mask_min_component and mask_max_hole must be >= 0",
                ),
            ],
            self,
        )

    @property
    def mask_total_steps(self) -> int:
        """The mask flow's optimiser steps."""
        return self.steps if self.mask_steps is None else self.mask_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SynthConfig:
        # a config stored before a field existed was trained without it: take the old
        # behaviour, not today's default
        return _from_dict(cls, {**SYNTH_PRE_FIELD_DEFAULTS, **d})


@dataclass(frozen=True)
class AlignConfig:
    """Hyperparameters of stage 2: reward fine-tuning of the image flow towards K unlabelled
    reference images of the target site.

    Attributes:
        k: use the first ``k`` reference files (sorted by name); None uses all.
        reference_seed: None keeps the files in name order; an int shuffles them with
            this seed before the first ``k`` are taken (so K references are a random draw,
            and one seed's K = 1 files are among its K = 5 files).
        steps: optimiser steps.
        batch_size: images generated per step.
        sampler_steps: Euler steps of the sampler the reward is back-propagated through.
        lr: AdamW learning rate (constant after a short warm-up).
        reg_weight: weight of the regulariser that keeps the velocity field near stage 1's
            on the states the sampler visits.
        encoder_seed: seed of the frozen random feature encoder of the reward.
        reward_features: the feature groups of the reward's encoder, in this order: any of
            moments, histogram, style, fine_histogram, laplacian, lowfreq (the default, the
            first three, are the encoder's original features; docs/ALIGNFLOW.md).
        checkpointing: recompute each sampler step in the backward pass (gradient
            checkpointing) instead of storing its activations.
        seed: seeds masks, noise and the choice of source images for feature scaling.
        threads: intra-op threads on CPU; None uses every core.
        masks: where the masks the images are generated for come from: "flow" (samples of
            the frozen mask flow) or "real" (the labelled source's training masks, at the
            model's size; ``align`` then needs the source dataset).
        start_time: 0 integrates the sampler from noise; t0 in (0, 1) translates: it starts
            from ``(1 - t0) * noise + t0 * image``, the image of each real mask, and
            integrates from t0 to 1 only (needs masks "real"; sampling needs the images).
        keep_outline: for a source with a zero background, every pixel that stage 1's image
            flow leaves as background (for the same mask and start) stays background in the
            aligned images, in the reward and in ``synth sample``: the reward can then change
            the tissue's appearance but not grow the head into the background (which it did
            at ``reg_weight`` 0.1; docs/ALIGNFLOW.md). The aligned checkpoint keeps stage 1's
            image network for it.
        class_anchor_weight: weight of the class-anchor term (:mod:`medflow.synthesis.anchors`):
            each class's mean intensity in the aligned images (by their masks, over their
            tissue) is held to the target's, estimated from the references by a mixture
            with the classes' shares fixed (or, with ``anchor_segmenter``, as their means
            under that segmenter's labels); 0 (the default) leaves the objective as before.
        anchor_segmenter: a ``medflow train`` checkpoint whose labels of the references
            give the class anchors (their class means under its argmax, as the segmenter
            sees them), instead of the mixture; needs ``class_anchor_weight`` > 0. The
            harness's ``judge`` sets it to a segmenter it trained.
        judge_weight: weight of the judge term (:mod:`medflow.synthesis.judge`): the mean
            cross-entropy of ``judge_segmenter``'s prediction on each aligned image against
            its mask, over the tissue; 0 (the default) leaves the objective as before.
        judge_segmenter: the ``medflow train`` checkpoint of the judge (frozen), e.g. the
            source segmenter trained under strong appearance augmentation; needs
            ``judge_weight`` > 0, and ``synth align`` needs it when that weight is. The
            harness's ``judge`` sets it to a segmenter it trained.
    """

    k: int | None = None
    reference_seed: int | None = None
    steps: int = 100
    batch_size: int = 8
    sampler_steps: int = 4
    lr: float = 1e-3
    reg_weight: float = 1.0
    encoder_seed: int = 0
    reward_features: tuple[str, ...] = DEFAULT_REWARD_FEATURES
    checkpointing: bool = True
    seed: int = 0
    threads: int | None = None
    masks: str = "flow"
    start_time: float = 0.0
    keep_outline: bool = True
    class_anchor_weight: float = 0.0
    anchor_segmenter: str | None = None
    judge_weight: float = 0.0
    judge_segmenter: str | None = None

    def __post_init__(self) -> None:
        _check(
            [
                (self.k is None or self.k >= 1, "k must be >= 1"),
                (self.masks in ("flow", "real"), "masks must be 'flow' or 'real'"),
                (0.0 <= self.start_time < 1.0, "start_time must be in [0, 1)"),
                (
                    self.start_time == 0.0 or self.masks == "real",
                    "start_time > 0 starts from partly noised real images: it needs masks 'real'",
                ),
                (self.steps >= 1 and self.batch_size >= 2, "steps >= 1 and batch_size >= 2"),
                (self.sampler_steps >= 1, "sampler_steps must be >= 1"),
                (self.lr > 0, "lr must be positive"),
                (self.reg_weight >= 0, "reg_weight must be >= 0"),
                (self.class_anchor_weight >= 0, "class_anchor_weight must be >= 0"),
                (
                    self.anchor_segmenter is None or self.class_anchor_weight > 0,
                    "anchor_segmenter gives class anchors: it needs class_anchor_weight > 0",
                ),
                (self.judge_weight >= 0, "judge_weight must be >= 0"),
                (
                    self.judge_segmenter is None or self.judge_weight > 0,
                    "judge_segmenter is the judge term's judge: it needs judge_weight > 0",
                ),
            ],
            self,
        )
        # stored configs hold the tuple as a JSON list
        object.__setattr__(self, "reward_features", check_reward_features(self.reward_features))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AlignConfig:
        return _from_dict(cls, d)
