"""What `medflow bench` runs: its methods, their sampling settings, the two modes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from medflow.errors import MedflowError

BUDGETS = ("steps", "time", "plateau")
# bench method -> TrainConfig fields; the ablations are MedFlowSeg with a module switched off
# (the image branch stays: without DBSA its features are added at every level)
METHODS: dict[str, dict] = {
    "unet": {"model": "unet"},
    "medflowseg": {"model": "medflowseg"},
    "medflowseg-no-dbsa": {"model": "medflowseg", "dbsa": False},
    "medflowseg-no-faa": {"model": "medflowseg", "faa": False},
    "medflowseg-no-both": {"model": "medflowseg", "dbsa": False, "faa": False},
    "diffusion": {"model": "diffusion"},
    # the reworked modules (docs/MODEL.md 6.1, 6.2): both, and each beside the other's v1
    "medflowseg-v2": {"model": "medflowseg", "dbsa_version": 2, "faa_version": 2, "faa_levels": 2},
    "medflowseg-dbsa-v2": {"model": "medflowseg", "dbsa_version": 2},
    "medflowseg-faa-v2": {"model": "medflowseg", "faa_version": 2, "faa_levels": 2},
}
ABLATIONS = ("medflowseg-no-dbsa", "medflowseg-no-faa", "medflowseg-no-both")
# MedFlowSeg with DBSA and/or FAA in their second version; sampled as the ablations are
VARIANTS = ("medflowseg-v2", "medflowseg-dbsa-v2", "medflowseg-faa-v2")


def _euler(steps: int) -> tuple[str, dict]:
    """``steps`` Euler steps of the instantaneous field, named so: explicit, so that a model
    with shortcut jumps (whose ``auto`` mask is the one-step posterior mean) takes them too."""
    return f"euler-{steps}", {"sampler": "euler", "steps": steps}


# sampling settings per method: (label, SamplingOptions fields)
FULL_SETTINGS = {
    "unet": [("1 call", {})],
    "medflowseg": [
        _euler(1),
        _euler(2),
        _euler(4),
        _euler(8),
        ("euler-1 x5", {"sampler": "euler", "steps": 1, "samples": 5}),
    ],
    "diffusion": [
        ("ddim-10", {"sampler": "ddim", "steps": 10}),
        ("ddim-50", {"sampler": "ddim", "steps": 50}),
        ("ddim-10 x5", {"sampler": "ddim", "steps": 10, "samples": 5}),
        ("ddpm-1000", {"sampler": "ddpm", "steps": 1000}),
    ],
    **{a: [_euler(1), _euler(4)] for a in (*ABLATIONS, *VARIANTS)},
}
QUICK_SETTINGS = {
    "unet": [("1 call", {})],
    "medflowseg": [_euler(1), _euler(4)],
    "diffusion": [("ddim-10", {"sampler": "ddim", "steps": 10})],
    **{a: [_euler(1)] for a in (*ABLATIONS, *VARIANTS)},
}
# the full mode's shared TrainConfig fields (see BenchConfig for what they cost)
FULL_TRAIN = {"size": 64, "batch_size": 8, "val_every": 50, "checkpoint_every": 150}
# probe steps left untimed at the start: the first steps fill the allocator and oneDNN caches
PROBE_UNTIMED = 2
# TrainConfig fields recorded in every row: which network the method trained
NETWORK_FIELDS = (
    "model",
    "dbsa",
    "faa",
    "image_branch",
    "dbsa_version",
    "faa_version",
    "faa_levels",
    "channels",
    "size",
)


@dataclass(frozen=True)
class BenchConfig:
    """What `medflow bench` runs; the defaults are the full mode (:meth:`full`).

    Attributes:
        datasets: embedded dataset names, built into ``<out>/data``, or paths of nnU-Net raw
            folders (with ``imagesTs``/``labelsTs``).
        methods: bench methods to compare (keys of :data:`METHODS`).
        budgets: ``"steps"``, ``"time"`` and/or ``"plateau"`` (each method trains until
            its validation Dice has not risen for ``plateau_patience`` validations with the
            learning rate already halved ``plateau_reductions`` times, at most
            ``plateau_cap`` steps; the rows record the steps it took and its validation
            curve).
        steps: training steps under the steps budget.
        seconds: training seconds under the time budget (None: what MedFlowSeg needs for
            ``steps``, so the two budgets share their MedFlowSeg run's length).
        seeds: training seeds.
        settings: sampling settings per method (label, SamplingOptions fields).
        train: TrainConfig fields shared by every run (size, batch, channels, ...).
        probe_steps: timed steps of the probe that sets the time budget's steps (after
            ``PROBE_UNTIMED`` untimed ones; the probe's last step, which validates, is not
            timed either).
        latency_slices: slices timed one by one for the latency.
        plateau_cap: the most steps a run of the plateau budget may train.
        plateau_patience: validations without a rise (``TrainConfig.plateau_delta``) that
            make a stall under the plateau budget.
        plateau_reductions: stalls that halve the learning rate before one ends the run
            (``TrainConfig.lr_schedule="plateau"``); 0: the first stall ends it, at the
            constant peak rate (the first plateau runs, which measured the generative
            models' instability at that rate, docs/BENCHMARKS.md).
        first_seed_only_above: settings with more network calls per image than this are
            predicted, scored and timed on the first seed only (latency on one slice,
            throughput on ``latency_slices`` slices); None: every setting on every seed.
    """

    datasets: tuple[str, ...] = ("mni152-tissue", "dsb-nuclei")
    # the module variants only when named (--methods): the full mode stays its measured size
    methods: tuple[str, ...] = tuple(m for m in METHODS if m not in VARIANTS)
    budgets: tuple[str, ...] = ("steps",)
    steps: int = 150
    seconds: float | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    settings: dict = field(default_factory=lambda: FULL_SETTINGS)
    train: dict = field(default_factory=lambda: dict(FULL_TRAIN))
    probe_steps: int = 50
    latency_slices: int = 8
    plateau_cap: int = 3000
    plateau_patience: int = 5
    plateau_reductions: int = 3
    first_seed_only_above: int | None = 100

    @classmethod
    def full(cls) -> BenchConfig:
        """About 45 minutes on the 2-core CPU: 64 x 64, batch 8, 150 steps, 3 seeds, both
        datasets, six methods (the module :data:`VARIANTS` only when named), every sampler,
        the steps budget.

        Measured (docs/BENCHMARKS.md): 43 min on a quiet 2-core machine, 2 threads, DDPM-1000
        included — training 27-44 s per run of 150 steps, 36 runs. The estimate written
        before the first run, from the quick bench's costs, was 46-62 min: training 22 min,
        every setting but DDPM-1000 11 min, DDPM-1000 on the first seed 12-28 min, datasets
        1 min. ``--budget steps time`` trains and scores every method a second time (the
        time budget alone, without DDPM-1000, is measured in docs/BENCHMARKS.md).
        """
        return cls()

    @classmethod
    def quick(cls) -> BenchConfig:
        """A few minutes on a 2-core CPU: 64 x 64, 60 steps, one seed, cheap samplers."""
        return cls(
            methods=("unet", "medflowseg", "diffusion"),
            budgets=("steps",),
            steps=60,
            seeds=(0,),
            settings=QUICK_SETTINGS,
            train={"size": 64, "batch_size": 8, "val_every": 30, "checkpoint_every": 60},
            probe_steps=20,
            latency_slices=4,
        )

    def without_settings(self, labels) -> BenchConfig:
        """This configuration without the sampling settings named in ``labels`` (e.g.
        ``["ddpm-1000"]``), for every method that has them.

        Raises:
            MedflowError: a label that no method of this configuration has, or a method
                left with no setting.
        """
        labels = set(labels)
        have = {label for m in self.methods for label, _ in self.settings[m]}
        unknown = sorted(labels - have)
        if unknown:
            raise MedflowError(
                f"--skip-settings {' '.join(unknown)}: not a sampling setting of "
                f"{', '.join(self.methods)} (settings: {', '.join(sorted(have))})"
            )
        settings = {m: [s for s in v if s[0] not in labels] for m, v in self.settings.items()}
        emptied = [m for m in self.methods if not settings[m]]
        if emptied:
            raise MedflowError(f"--skip-settings leaves {', '.join(emptied)} with no setting")
        return dataclasses.replace(self, settings=settings)

    def __post_init__(self) -> None:
        bad = [b for b in self.budgets if b not in BUDGETS]
        if bad or not self.budgets:
            raise MedflowError(f"budget must be among {BUDGETS}, got {list(self.budgets)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise MedflowError(f"method must be among {tuple(METHODS)}, got {list(self.methods)}")
        missing = [m for m in self.methods if m not in self.settings]
        if missing:
            raise MedflowError(f"no sampling settings for method(s) {missing}")
        if not self.seeds:
            raise MedflowError("seeds: need at least one seed")
        if self.plateau_cap < 1 or self.plateau_patience < 1:
            raise MedflowError(
                f"plateau_cap and plateau_patience must be >= 1, got {self.plateau_cap} and "
                f"{self.plateau_patience}"
            )
        if self.plateau_reductions < 0:
            raise MedflowError(f"plateau_reductions must be >= 0, got {self.plateau_reductions}")
        if self.probe_steps < 1 or self.latency_slices < 1:
            raise MedflowError(
                f"probe_steps and latency_slices must be >= 1, got {self.probe_steps} "
                f"and {self.latency_slices}"
            )
        if self.first_seed_only_above is not None and self.first_seed_only_above < 1:
            raise MedflowError(
                f"first_seed_only_above must be >= 1 or None, got {self.first_seed_only_above}"
            )
