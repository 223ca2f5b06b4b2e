"""How to train on a dataset, decided from its fingerprint (nnU-Net's experiment planning).

:func:`plan_from_fingerprint` turns a :class:`~medflow.data.fingerprint.Fingerprint` into a
:class:`Plan`: slice axis, target in-plane spacing, patch size, network depth and width,
batch size for a memory budget, intensity normalisation and patch sampling. Every choice
comes with one line in ``Plan.reasons`` saying why, and every choice can be overridden by
name (``overrides={"patch_size": (256, 256)}``, or ``medflow plan --set patch_size=256,256``);
later choices then follow from the overridden value (a smaller patch gets fewer levels and a
larger batch). docs/PLANNING.md states the rules and shows the plans of the embedded sets.

A plan is what ``medflow train`` will consume once patch training lands: ``slice_axis``,
``normalisation`` and ``ct_stats`` map onto
:class:`medflow.data.transforms.Preprocessing`; ``target_spacing`` is the grid slices are
resampled to; ``patch_size``, ``channels`` (one width per level) and ``batch_size`` size the
network and the batches; ``foreground_fraction``, ``class_balanced`` and ``context_slices``
drive the patch sampler. Until then ``train`` still resizes every slice to ``--size``.

In-plane tuples (``target_spacing``, ``median_shape``, ``patch_size``) follow the two axes
other than ``slice_axis`` in increasing order: for ``slice_axis`` 2 of an ``(X, Y, Z)``
volume, ``(X, Y)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medflow.data.fingerprint import Fingerprint
from medflow.data.io import atomic_write
from medflow.data.plan_fields import FIELDS, parse_overrides
from medflow.errors import DataError

PLAN_FORMAT = "medflow-plan-v1"

# slice across the coarsest axis when it is this much coarser than the finest (nnU-Net's 3)
ANISOTROPY_THRESHOLD = 3.0
# downsample until the bottleneck is 4-8 px; deeper nets gain little on 2D slices
MIN_BOTTLENECK = 4
MAX_LEVELS = 6
MIN_LEVELS = 2
# widths of nnU-Net's 2D U-Net: 32 at full resolution, doubling per level, at most 512
BASE_CHANNELS = 32
MAX_CHANNELS = 512
# Activation memory, in float32 values per channel and pixel of each level: the tensors that
# autograd saves for backward in medflow's flow SegNet (x_t trunk, image branch, DBSA, FAA,
# time modulation), counted once per storage with torch.autograd.graph.saved_tensors_hooks,
# are 38-39 values (channels 32..256 at 64 x 64 px and 32..512 at 128 x 128 px); rounded up
# to 40. Mixed precision would halve it.
ACTIVATION_FACTOR = 40
BYTES_PER_VALUE = 4
# weights: eight 3 x 3 convolutions of c -> c per level (trunk and decoder; 6.3 M estimated
# against SegNet's 6.6 M for channels 32..256), held five times: weights, gradients, AdamW's
# two moments and the EMA copy
CONVS_PER_LEVEL = 8
PARAMETER_COPIES = 5
MIN_BATCH = 2
# nnU-Net: a batch covers at most 5 % of the training set, so small sets still get many steps
MAX_BATCH_FRACTION = 0.05
DEFAULT_MEMORY_GIB = 8.0
# On a CPU a step costs in proportion to the pixels it carries, and a time-budgeted run learns
# from the number of steps: keep the pixels per step of medflow's CPU default (16 slices of
# 96 x 96), which the demo budget was tuned with. nnU-Net's rules (memory, 5 % of the data)
# are for a GPU, where a larger batch costs little more time: at 4 CPU-minutes on
# mni152-lesions its batch of 45 ran 28 steps (benchmarks/results/lesion_batch.json).
CPU_PIXELS_PER_STEP = 16 * 96 * 96
# nnU-Net centres a third of the patches on foreground
FOREGROUND_FRACTION = 1.0 / 3.0
# a class below 1 % of the voxels, or whose typical object (voxel-weighted median diameter)
# spans under 1/16 of the patch's field of view, is missed by most random patches: sample
# classes evenly instead
RARE_FREQUENCY = 0.01
SMALL_OBJECT_FRACTION = 1.0 / 16.0

_SCHEME_TEXT = {
    "ct": "CT: clip to the foreground {lo:g} / {hi:g} (0.5 / 99.5 percentiles), then z-score "
    "with the foreground mean {mean:g} and std {std:g} (Hounsfield units mean the same in "
    "every scan)",
    "zscore": "z-score per image over nonzero voxels (MRI and microscopy intensities have no "
    "absolute scale)",
    "none": "no normalisation (noNorm)",
    "rescale": "min-max to [0, 1] per image (rescale_to_0_1)",
    "rgb": "divide by 255 (rgb_to_0_1)",
}


@dataclass(frozen=True)
class Plan:
    """How to train on one dataset; see the module docstring and docs/PLANNING.md.

    Attributes:
        dataset: the dataset's name.
        dims: 2 for 2D images, 3 for volumes.
        slice_axis: spatial axis (0, 1, 2 of ``(X, Y, Z)``) that 2D slices are taken across.
        target_spacing: in-plane spacing in mm that slices are resampled to.
        median_shape: median in-plane size of the cases cropped to nonzero, in pixels at
            ``target_spacing`` (a fact about the data, not settable).
        patch_size: in-plane training patch in pixels, each a multiple of
            ``2 ** (levels - 1)``.
        levels: resolution levels of the U-Net (``levels - 1`` downsamplings).
        channels: network width per level, ``len(channels) == levels``.
        batch_size: patches per optimiser step.
        memory_gib: the memory budget in GiB the batch size is fitted to.
        estimated_memory_gib: the training memory estimated for this patch, width and batch
            (see :func:`estimate_memory_bytes`; not settable).
        normalisation: scheme per channel: ct, zscore, none, rescale or rgb.
        ct_stats: ``(lo, hi, mean, std)`` per ``ct`` channel, in channel order.
        foreground_fraction: fraction of patches centred on a foreground voxel.
        class_balanced: foreground patches pick a class uniformly first, then a voxel of it
            (else a foreground voxel uniformly), so rare and small classes are seen.
        context_slices: neighbouring slices on each side given as extra channels (2.5D).
        compute: ``"gpu"`` (nnU-Net's batch rules) or ``"cpu"`` (the batch also capped at
            :data:`CPU_PIXELS_PER_STEP`), the kind of machine the plan is for.
        reasons: one line per choice, ``"field: why"``.
    """

    dataset: str
    dims: int
    slice_axis: int
    target_spacing: tuple[float, float]
    median_shape: tuple[int, int]
    patch_size: tuple[int, int]
    levels: int
    channels: tuple[int, ...]
    batch_size: int
    memory_gib: float
    estimated_memory_gib: float
    normalisation: tuple[str, ...]
    ct_stats: tuple[tuple[float, float, float, float], ...]
    foreground_fraction: float
    class_balanced: bool
    context_slices: int
    compute: str = "gpu"  # plans written before this field were planned by the GPU rules
    reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, parse in FIELDS.items():
            object.__setattr__(self, name, parse(name, getattr(self, name)))
        if len(self.channels) != self.levels:
            raise ValueError(
                f"plan field 'channels': {len(self.channels)} widths for {self.levels} levels"
            )
        unit = 2 ** (self.levels - 1)
        if any(p % unit for p in self.patch_size):
            raise ValueError(
                f"plan field 'patch_size': {_px(self.patch_size)} is not a multiple of "
                f"{unit} (2^(levels-1) for {self.levels} levels)"
            )
        n_ct = self.normalisation.count("ct")
        if len(self.ct_stats) != n_ct:
            raise ValueError(
                f"plan field 'ct_stats': {len(self.ct_stats)} entries for {n_ct} ct channel(s)"
            )
        if self.dims == 2 and self.context_slices:
            raise ValueError("plan field 'context_slices': 2D images have no neighbouring slices")

    @property
    def inplane_axes(self) -> tuple[int, int]:
        """The two spatial axes of a slice, in increasing order."""
        a, b = (x for x in range(3) if x != self.slice_axis)
        return a, b

    def reason(self, name: str) -> str:
        """The reason given for field ``name`` (without the ``"name: "`` prefix)."""
        for line in self.reasons:
            if line.startswith(f"{name}: "):
                return line[len(name) + 2 :]
        raise KeyError(name)

    def to_dict(self) -> dict:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """A plan from :meth:`to_dict`'s dict (``format`` key allowed), validated.

        Raises:
            ValueError: a field is missing, unknown or holds a bad value (named).
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names) - {"format"})
        if unknown:
            raise ValueError(f"unknown plan field {unknown[0]!r}")
        defaulted = {
            f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
        }
        missing = [n for n in names if n not in d and n not in defaulted]
        if missing:
            raise ValueError(f"plan field {missing[0]!r} is missing")
        return cls(**{n: d[n] for n in names if n in d})


# ------------------------------------------------------------------------ memory estimate


def level_channels(levels: int, base: int = BASE_CHANNELS, cap: int = MAX_CHANNELS) -> tuple:
    """Widths ``min(base * 2**l, cap)`` for levels ``l = 0 .. levels - 1``."""
    return tuple(min(base * 2**level, cap) for level in range(levels))


def estimate_memory_bytes(
    patch_size: tuple[int, int], channels: tuple[int, ...], batch_size: int
) -> int:
    """Training memory of the flow U-Net, estimated for planning (docs/PLANNING.md).

    ``activations = batch x sum_l channels[l] x pixels_l x ACTIVATION_FACTOR x 4 bytes``,
    ``pixels_l`` the patch's pixels at level ``l`` (halved per axis per level), plus
    ``parameters = sum_l CONVS_PER_LEVEL x 9 x channels[l]^2 x PARAMETER_COPIES x 4 bytes``.
    Monotone in the patch, the widths and the batch.
    """
    h, w = patch_size
    per_sample = sum(
        c * math.ceil(h / 2**level) * math.ceil(w / 2**level) for level, c in enumerate(channels)
    )
    activations = batch_size * per_sample * ACTIVATION_FACTOR * BYTES_PER_VALUE
    parameters = sum(CONVS_PER_LEVEL * 9 * c * c for c in channels)
    return int(activations + parameters * PARAMETER_COPIES * BYTES_PER_VALUE)


def max_batch(patch_size: tuple[int, int], channels: tuple[int, ...], memory_gib: float) -> int:
    """The largest batch whose :func:`estimate_memory_bytes` fits ``memory_gib`` (0 when even
    one patch does not)."""
    budget = memory_gib * 2**30
    fixed = estimate_memory_bytes(patch_size, channels, 0)
    per = estimate_memory_bytes(patch_size, channels, 1) - fixed
    return max(0, int((budget - fixed) // per))


# ------------------------------------------------------------------------------- planning


@dataclass
class _Draft:
    """The plan as it is being decided: fields so far and their reasons."""

    fields: dict[str, Any]
    reasons: dict[str, str]
    overrides: dict[str, Any]

    def decide(self, name: str, value: Any, why: str) -> Any:
        """Set ``name`` to its override if given, else to ``value`` with reason ``why``."""
        if name in self.overrides:
            rule, value = value, self.overrides[name]
            why = f"{_show(value)}: set by override (the rule gave {_show(rule)})"
        self.fields[name] = value
        self.reasons[name] = why
        return value


def plan_from_fingerprint(
    fp: Fingerprint,
    *,
    memory_gib: float = DEFAULT_MEMORY_GIB,
    overrides: dict[str, Any] | None = None,
    compute: str = "gpu",
) -> Plan:
    """Decide how to train on the dataset that ``fp`` describes.

    Args:
        fp: the dataset's fingerprint (:func:`medflow.data.fingerprint.fingerprint_dataset`).
        memory_gib: memory budget for training (GPU memory, or RAM on a CPU), in GiB.
        overrides: field name -> value (typed, or text as ``--set`` gives it); an
            overridden field replaces the rule's choice and later choices follow from it.
        compute: ``"gpu"`` or ``"cpu"``, the machine the plan is for (``--set compute=``
            overrides it too): on a CPU the batch is capped by pixels per step.

    Returns:
        The plan, with one reason per field in ``reasons``.

    Raises:
        ValueError: an override names an unknown field or holds a bad value, or the memory
            budget cannot hold a batch of ``MIN_BATCH`` of the smallest patch (named).
    """
    over = parse_overrides(overrides)
    # --set memory_gib=G is the same as memory_gib=G
    memory_gib = over.pop("memory_gib", None) or FIELDS["memory_gib"]("memory_gib", memory_gib)
    draft = _Draft({}, {}, over)
    compute = draft.decide(
        "compute",
        FIELDS["compute"]("compute", compute),
        f"{compute}: planned for a {compute.upper()}, the machine planning or training "
        "(--set compute=cpu|gpu to plan for another)",
    )
    spacing = np.median(fp.spacings, axis=0)
    axis = _decide_slice_axis(draft, fp, spacing)
    inplane = [a for a in range(3) if a != axis]
    target = draft.decide(
        "target_spacing",
        tuple(float(spacing[a]) for a in inplane),
        _spacing_reason(fp, inplane),
    )
    shapes = fp.crop_shapes[:, inplane] * fp.spacings[:, inplane] / np.array(target)
    median_shape = tuple(max(1, int(round(s))) for s in np.median(shapes, axis=0))
    draft.fields["median_shape"] = median_shape
    draft.reasons["median_shape"] = (
        f"{_px(median_shape)} px: median in-plane size of the cases cropped to nonzero, at "
        "the target spacing"
    )
    _decide_network(draft, median_shape, memory_gib)
    total_px = float(np.sum(np.prod(shapes, axis=1) * fp.crop_shapes[:, axis]))
    _decide_batch(draft, total_px, memory_gib, compute)
    _decide_normalisation(draft, fp)
    draft.decide(
        "foreground_fraction",
        FOREGROUND_FRACTION,
        f"{FOREGROUND_FRACTION:.3f}: a third of the patches are centred on a foreground voxel, "
        "the rest anywhere (nnU-Net's oversampling)",
    )
    _decide_class_balance(draft, fp)
    draft.decide(
        "context_slices",
        0,
        "0: one slice per input (2D); set context_slices to add neighbours as channels (2.5D)",
    )
    plan_fields = dict(draft.fields)
    plan_fields["memory_gib"] = memory_gib
    plan_fields["estimated_memory_gib"] = round(
        estimate_memory_bytes(
            plan_fields["patch_size"], plan_fields["channels"], plan_fields["batch_size"]
        )
        / 2**30,
        3,
    )
    order = [f.name for f in dataclasses.fields(Plan) if f.name in draft.reasons]
    return Plan(
        dataset=fp.name,
        dims=fp.dims,
        reasons=tuple(f"{name}: {draft.reasons[name]}" for name in order),
        **plan_fields,
    )


def _decide_slice_axis(draft: _Draft, fp: Fingerprint, spacing: np.ndarray) -> int:
    shape = np.median(np.array([c.shape for c in fp.cases]), axis=0)
    singleton = [a for a in range(3) if shape[a] == 1]
    coarse, fine = float(spacing.max()), float(spacing.min())
    ratio = coarse / fine
    if fp.dims == 2 and singleton:
        axis = singleton[-1]
        why = f"{axis}: 2D images, sliced across their singleton axis"
    elif ratio > ANISOTROPY_THRESHOLD:
        axis = int(np.argmax(spacing))
        why = (
            f"{axis}: anisotropic, axis {axis} is {coarse:g} mm, {ratio:.1f}x the finest "
            f"{fine:g} mm (> {ANISOTROPY_THRESHOLD:g}x): slices lie in the fine acquisition "
            "plane"
        )
    else:
        # nnU-Net 2d slices across the coarsest axis of its (z, y, x) arrays, the first on a
        # tie; reversed to medflow's (X, Y, Z) that is the last of the coarsest: axial
        axis = max(a for a in range(3) if np.isclose(spacing[a], coarse, rtol=1e-3))
        why = (
            f"{axis}: near-isotropic (coarsest / finest {ratio:.2f} <= "
            f"{ANISOTROPY_THRESHOLD:g}), the coarsest axis, the last on a tie (axial for RAS "
            "NIfTI), as nnU-Net 2d's transpose chooses"
        )
    axis = draft.decide("slice_axis", axis, why)
    if fp.dims == 2 and singleton and axis not in singleton:
        raise ValueError(
            f"plan field 'slice_axis': {axis} lies in the plane of these 2D images; a 2D "
            f"image is sliced across its singleton axis {singleton[-1]}"
        )
    return axis


def _spacing_reason(fp: Fingerprint, inplane: list[int]) -> str:
    sp = fp.spacings[:, inplane]
    med = np.median(sp, axis=0)
    text = f"{_mm(med)} mm: median in-plane spacing of the {len(fp.cases)} training case(s)"
    if np.ptp(sp, axis=0).max() > 1e-3 * med.max():
        text += f" (range {_mm(sp.min(axis=0))} to {_mm(sp.max(axis=0))} mm)"
    return text


def _depth(patch: tuple[int, ...]) -> int:
    """Levels that halve the patch's short side to a ``MIN_BOTTLENECK``-``2 MIN_BOTTLENECK-1``
    px bottleneck, within ``MIN_LEVELS``..``MAX_LEVELS``."""
    steps = int(math.floor(math.log2(max(min(patch) / MIN_BOTTLENECK, 1.0))))
    return int(min(max(1 + steps, MIN_LEVELS), MAX_LEVELS))


def _round_down(shape: tuple[int, ...], levels: int) -> tuple[int, int]:
    unit = 2 ** (levels - 1)
    return tuple(max(unit, (s // unit) * unit) for s in shape)


def _fit_patch(
    median_shape: tuple[int, int],
    fixed_levels: int | None,
    widths: Callable[[int], tuple[int, ...]],
    memory_gib: float,
) -> tuple[tuple[int, int], int]:
    """The median shape rounded down to its levels' multiple, then shrunk one multiple at a
    time along the axis largest relative to the median shape (nnU-Net's order) until a
    batch of ``MIN_BATCH`` fits; levels follow the patch unless ``fixed_levels``.

    Raises:
        ValueError: not even the smallest patch fits (naming ``memory_gib``).
    """
    levels = fixed_levels or _depth(median_shape)
    patch = _round_down(median_shape, levels)
    while max_batch(patch, widths(levels), memory_gib) < MIN_BATCH:
        unit = 2 ** (levels - 1)
        ratios = [p / m for p, m in zip(patch, median_shape)]
        order = sorted(range(2), key=lambda a: (ratios[a], patch[a]), reverse=True)
        shrinkable = [a for a in order if patch[a] > unit]
        if not shrinkable:
            if fixed_levels is None and levels > MIN_LEVELS:
                levels -= 1  # the patch is one unit: only a shallower net is smaller
                continue
            need = estimate_memory_bytes(patch, widths(levels), MIN_BATCH) / 2**30
            raise ValueError(
                f"plan field 'memory_gib': {memory_gib:g} GiB cannot hold a batch of "
                f"{MIN_BATCH} patches of {_px(patch)} px (estimate {need:.2f} GiB); raise it"
            )
        patch = tuple(p - unit if i == shrinkable[0] else p for i, p in enumerate(patch))
        levels = fixed_levels or _depth(patch)
        patch = _round_down(patch, levels)
    return patch, levels


def _decide_network(draft: _Draft, median_shape: tuple[int, int], memory_gib: float) -> None:
    """Patch size, levels and widths (see :func:`_fit_patch`)."""
    over = draft.overrides
    if "channels" in over and "levels" in over and len(over["channels"]) != over["levels"]:
        raise ValueError(
            f"plan field 'channels': {len(over['channels'])} widths for levels {over['levels']}"
        )
    fixed_levels = over.get("levels", len(over["channels"]) if "channels" in over else None)

    def widths(levels: int) -> tuple[int, ...]:
        return over.get("channels", level_channels(levels))

    start_levels = fixed_levels or _depth(median_shape)
    start = _round_down(median_shape, start_levels)
    rounded = (
        f"the median shape {_px(median_shape)} rounded down to multiples of "
        f"{2 ** (start_levels - 1)} (2^(levels-1))"
    )
    if "patch_size" in over:
        patch = over["patch_size"]
        levels = fixed_levels or _depth(patch)
        why = f"{_px(patch)} px: set by override"
    else:
        patch, levels = _fit_patch(median_shape, fixed_levels, widths, memory_gib)
        why = f"{_px(patch)} px: {rounded}"
        if patch != start:
            why += (
                f" gave {_px(start)}, shrunk along the axis largest relative to the median "
                f"shape until a batch of {MIN_BATCH} fits {memory_gib:g} GiB"
            )
        else:
            why += f"; a batch of {MIN_BATCH} fits {memory_gib:g} GiB"
    draft.fields["patch_size"] = patch
    draft.reasons["patch_size"] = why
    draft.fields["levels"] = levels
    draft.reasons["levels"] = _levels_reason(levels, patch, over)
    chans = widths(levels)
    draft.fields["channels"] = chans
    draft.reasons["channels"] = (
        f"{_show(chans)}: set by override"
        if "channels" in over
        else f"{_show(chans)}: {BASE_CHANNELS} at full resolution, doubling per level, at "
        f"most {MAX_CHANNELS} (nnU-Net's 2D widths)"
    )


def _levels_reason(levels: int, patch: tuple[int, int], over: dict[str, Any]) -> str:
    bottleneck = _px(tuple(p // 2 ** (levels - 1) for p in patch))
    if "levels" in over:
        return f"{levels}: set by override (bottleneck {bottleneck} px)"
    if "channels" in over:
        return f"{levels}: one per width given in channels (bottleneck {bottleneck} px)"
    if levels == MAX_LEVELS and min(patch) // 2 ** (levels - 1) >= 2 * MIN_BOTTLENECK:
        return (
            f"{levels}: capped at {MAX_LEVELS}; the bottleneck stays {bottleneck} px (deeper "
            "nets gain little on 2D slices)"
        )
    halvings = f"{levels - 1} halving{'s' if levels != 2 else ''}"
    return (
        f"{levels}: {halvings} take the patch to a {bottleneck} px bottleneck "
        f"({MIN_BOTTLENECK}-{2 * MIN_BOTTLENECK - 1} px on the short side)"
    )


def _decide_batch(draft: _Draft, total_px: float, memory_gib: float, compute: str) -> None:
    patch, chans = draft.fields["patch_size"], draft.fields["channels"]
    batch, why = _batch_rule(patch, chans, total_px, memory_gib, "batch_size" in draft.overrides)
    by_compute = max(MIN_BATCH, CPU_PIXELS_PER_STEP // (patch[0] * patch[1]))
    if compute == "cpu" and by_compute < batch:
        why = (
            f"{by_compute}: on a CPU, at most {CPU_PIXELS_PER_STEP} pixels per step (16 slices "
            f"of 96 x 96, medflow's CPU default; at least {MIN_BATCH}), so a time budget buys "
            f"steps; the GPU rule gives {why}"
        )
        batch = by_compute
    if "batch_size" in draft.overrides:
        est = estimate_memory_bytes(patch, chans, draft.overrides["batch_size"]) / 2**30
        fits = "within" if est <= memory_gib else "ABOVE"
        draft.fields["batch_size"] = draft.overrides["batch_size"]
        draft.reasons["batch_size"] = (
            f"{draft.overrides['batch_size']}: set by override (the rule gave {batch}; estimate "
            f"{est:.2f} GiB, {fits} the {memory_gib:g} GiB budget)"
        )
        return
    draft.fields["batch_size"] = batch
    draft.reasons["batch_size"] = why


def _batch_rule(patch, chans, total_px: float, memory_gib: float, overridden: bool):
    """nnU-Net's batch: the most that fits ``memory_gib``, at most 5 % of the data."""
    by_memory = max_batch(patch, chans, memory_gib)
    by_data = max(MIN_BATCH, int(MAX_BATCH_FRACTION * total_px // (patch[0] * patch[1])))
    if by_data < by_memory:
        return by_data, (
            f"{by_data}: nnU-Net's cap, a batch covers at most {MAX_BATCH_FRACTION:.0%} of the "
            f"{total_px:.3g} training pixels (at least {MIN_BATCH}); memory would allow "
            f"{by_memory}"
        )
    if by_memory < 1 and not overridden:
        need = estimate_memory_bytes(patch, chans, 1) / 2**30
        raise ValueError(
            f"plan field 'memory_gib': {memory_gib:g} GiB cannot hold one patch of "
            f"{_px(patch)} px (estimate {need:.2f} GiB); raise it or set a smaller "
            "patch_size"
        )
    batch = max(by_memory, 1)
    est = estimate_memory_bytes(patch, chans, batch) / 2**30
    return batch, (
        f"{batch}: the most that fits {memory_gib:g} GiB (estimate {est:.2f} GiB, "
        f"{ACTIVATION_FACTOR} stored float32 values per channel and pixel per level, "
        "weights x5)"
    )


def _decide_normalisation(draft: _Draft, fp: Fingerprint) -> None:
    schemes = draft.decide(
        "normalisation",
        fp.schemes,
        "; ".join(
            f"channel {c} {s.name!r}: "
            + _SCHEME_TEXT[s.scheme].format(lo=s.p00_5, hi=s.p99_5, mean=s.mean, std=s.std)
            for c, s in enumerate(fp.intensity)
        ),
    )
    if len(schemes) != len(fp.intensity):
        raise ValueError(
            f"plan field 'normalisation': {len(schemes)} schemes for {len(fp.intensity)} channel(s)"
        )
    stats = tuple(
        (s.p00_5, s.p99_5, s.mean, max(s.std, 1e-6))
        for s, scheme in zip(fp.intensity, schemes)
        if scheme == "ct"
    )
    where = "foreground" if fp.foreground_stats else "all (no case has foreground)"
    draft.decide(
        "ct_stats",
        stats,
        f"{_show(stats)}: 0.5 / 99.5 percentiles, mean and std of {where} voxels of each ct "
        "channel over the training set"
        if stats
        else "(): no ct channel",
    )


def _decide_class_balance(draft: _Draft, fp: Fingerprint) -> None:
    patch, target = draft.fields["patch_size"], draft.fields["target_spacing"]
    fov = min(p * s for p, s in zip(patch, target))
    freq = fp.class_frequency
    flagged = []
    for obj in fp.objects:
        f = freq[obj.value]
        d = obj.typical_diameter_mm
        why = []
        if f < RARE_FREQUENCY:
            why.append(f"rare ({f:.2%} of voxels)")
        if d is not None and d < SMALL_OBJECT_FRACTION * fov:
            why.append(
                f"small (typical object {d:.3g} mm across, under 1/16 of the {fov:.3g} mm "
                "field of view)"
            )
        if why:
            flagged.append(f"{obj.name!r} is " + " and ".join(why))
    if flagged:
        why = "true: " + "; ".join(flagged) + ": foreground patches pick a class, then a voxel"
    else:
        why = (
            f"false: every class holds >= {RARE_FREQUENCY:.0%} of the voxels and its typical "
            f"object spans >= 1/16 of the {fov:.3g} mm field of view: foreground voxels are "
            "picked uniformly"
        )
    draft.decide("class_balanced", bool(flagged), why)


# ------------------------------------------------------------------------------ files, text


def write_plan(path: str | Path, plan: Plan) -> Path:
    """Write ``plan`` as JSON (``{"format": "medflow-plan-v1", ...}``), atomically."""
    text = json.dumps({"format": PLAN_FORMAT, **plan.to_dict()}, indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_plan(path: str | Path) -> Plan:
    """The plan written by :func:`write_plan`.

    Raises:
        DataError: the file is missing, not JSON, not a medflow plan or holds a bad field.
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, "plan file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(path, f"is not a readable plan (JSON): {exc}") from None
    if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
        raise DataError(path, f"is not a medflow plan (expected format {PLAN_FORMAT!r})")
    try:
        return Plan.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise DataError(path, str(exc)) from None


def format_plan(plan: Plan) -> str:
    """The plan as a two-column table followed by its reasons, for the terminal."""
    rows = [
        (f.name, _show(getattr(plan, f.name)))
        for f in dataclasses.fields(plan)
        if f.name != "reasons"
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"plan for {plan.dataset}", f"{'field'.ljust(width)}  value"]
    lines.append(f"{'-' * width}  {'-' * 30}")
    lines += [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines += ["", "reasons:"] + [f"  {line}" for line in plan.reasons]
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        if value and all(isinstance(v, tuple) for v in value):
            return "; ".join(_show(v) for v in value)
        return "(" + ", ".join(_show(v) for v in value) + ")" if value else "()"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _px(shape: tuple[int, ...]) -> str:
    return " x ".join(str(int(s)) for s in shape)


def _mm(values) -> str:
    return " x ".join(f"{float(v):.3g}" for v in values)
