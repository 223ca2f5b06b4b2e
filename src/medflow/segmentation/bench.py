"""`medflow bench`: UNet, MedFlowSeg and the diffusion baseline side by side, on the same data,
under the same budget, in one process.

For every dataset, budget, method and seed: train; then, for every sampling setting of that
method, predict the held-out split with the final EMA checkpoint and evaluate it at native
resolution (Dice, IoU, HD95, ASSD per class), and measure on the same test slices, under the
same threads: network latency (ms per slice at batch 1), throughput (slices per second at
the bench's batch), peak memory while predicting (resident set on CPU, max allocated on
CUDA) and the counted cost (:mod:`medflow.segmentation.cost`). Two budgets:

* ``steps``: every method trains the same number of steps;
* ``time``: every method trains for the same wall-clock time, the steps chosen from a short
  timed probe of that method on this machine (so each keeps a complete warm-up and cosine
  schedule).

Methods are the UNet, MedFlowSeg, its ablations (without DBSA, without FAA, without both)
and the diffusion baseline: each a set of TrainConfig fields (:data:`METHODS`). Settings of
more than ``BenchConfig.first_seed_only_above`` network calls per image (DDPM-1000) are
predicted, scored and timed on the first seed only, latency on one slice and throughput on
``latency_slices`` slices: on a 2-core CPU one DDPM-1000 pass over a test split takes minutes.

Writes ``results.json``, ``results.md``, ``dice_vs_cost.png`` and ``curves.png`` into the
output folder, and every run's own folder under ``runs/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medflow import __version__
from medflow.data.builtin import build as build_builtin
from medflow.data.datasets import prepare_image
from medflow.data.io import atomic_write, read_image
from medflow.data.layout import find_cases
from medflow.engine.logs import read_log
from medflow.engine.runtime import machine_info
from medflow.errors import MedflowError, OutputExistsError
from medflow.metrics.summary import evaluate_folders
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.cost import inference_cost
from medflow.segmentation.predict import Predictor, SamplingOptions, predict_folder
from medflow.segmentation.train import train

BUDGETS = ("steps", "time")
# bench method -> TrainConfig fields; the ablations are MedFlowSeg with a module switched off
# (the image branch stays: without DBSA its features are added at every level)
METHODS: dict[str, dict] = {
    "unet": {"model": "unet"},
    "medflowseg": {"model": "medflowseg"},
    "medflowseg-no-dbsa": {"model": "medflowseg", "dbsa": False},
    "medflowseg-no-faa": {"model": "medflowseg", "faa": False},
    "medflowseg-no-both": {"model": "medflowseg", "dbsa": False, "faa": False},
    "diffusion": {"model": "diffusion"},
}
ABLATIONS = ("medflowseg-no-dbsa", "medflowseg-no-faa", "medflowseg-no-both")


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
    **{a: [_euler(1), _euler(4)] for a in ABLATIONS},
}
QUICK_SETTINGS = {
    "unet": [("1 call", {})],
    "medflowseg": [_euler(1), _euler(4)],
    "diffusion": [("ddim-10", {"sampler": "ddim", "steps": 10})],
    **{a: [_euler(1)] for a in ABLATIONS},
}
# the full mode's shared TrainConfig fields (see BenchConfig for what they cost)
FULL_TRAIN = {"size": 64, "batch_size": 8, "val_every": 50, "checkpoint_every": 150}
# probe steps left untimed at the start: the first steps fill the allocator and oneDNN caches
PROBE_UNTIMED = 2
# TrainConfig fields recorded in every row: which network the method trained
NETWORK_FIELDS = ("model", "dbsa", "faa", "image_branch", "channels", "size")


@dataclass(frozen=True)
class BenchConfig:
    """What `medflow bench` runs; the defaults are the full mode (:meth:`full`).

    Attributes:
        datasets: embedded dataset names, built into ``<out>/data``, or paths of nnU-Net raw
            folders (with ``imagesTs``/``labelsTs``).
        methods: bench methods to compare (keys of :data:`METHODS`).
        budgets: ``"steps"`` and/or ``"time"``.
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
        first_seed_only_above: settings with more network calls per image than this are
            predicted, scored and timed on the first seed only (latency on one slice,
            throughput on ``latency_slices`` slices); None: every setting on every seed.
    """

    datasets: tuple[str, ...] = ("mni152-tissue", "dsb-nuclei")
    methods: tuple[str, ...] = tuple(METHODS)
    budgets: tuple[str, ...] = ("steps",)
    steps: int = 150
    seconds: float | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    settings: dict = field(default_factory=lambda: FULL_SETTINGS)
    train: dict = field(default_factory=lambda: dict(FULL_TRAIN))
    probe_steps: int = 50
    latency_slices: int = 8
    first_seed_only_above: int | None = 100

    @classmethod
    def full(cls) -> BenchConfig:
        """About 45 minutes on the 2-core CPU: 64 x 64, batch 8, 150 steps, 3 seeds, both
        datasets, six methods, every sampler, the steps budget.

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
        if self.probe_steps < 1 or self.latency_slices < 1:
            raise MedflowError(
                f"probe_steps and latency_slices must be >= 1, got {self.probe_steps} "
                f"and {self.latency_slices}"
            )
        if self.first_seed_only_above is not None and self.first_seed_only_above < 1:
            raise MedflowError(
                f"first_seed_only_above must be >= 1 or None, got {self.first_seed_only_above}"
            )


class _PeakRSS:
    """Highest resident set of this process while the block runs (sampled every 5 ms from
    /proc; on systems without it, the process's lifetime peak)."""

    def __enter__(self) -> _PeakRSS:
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _test_slices(data: Path, predictor: Predictor) -> torch.Tensor:
    cases = find_cases(data / "imagesTs", None, len(predictor.channel_names))
    if not cases:
        raise MedflowError(f"{data / 'imagesTs'}: no test images to benchmark on")
    return torch.cat([prepare_image(read_image(c.images), predictor.prep)[0] for c in cases])


def measure_setting(
    predictor: Predictor,
    slices: torch.Tensor,
    options: SamplingOptions,
    latency_slices: int,
    slow_above: int | None = None,
) -> dict:
    """Latency, throughput, peak memory and counted cost of one sampling setting.

    A setting of more than ``slow_above`` network calls per image is timed on less: latency
    on one slice (its own calls average the noise) and throughput on ``latency_slices``
    slices in one batch rather than the whole test split (``slow`` in the result).
    """
    # what predict draws the mask with (for a shortcut model and sampler auto, the
    # one-evaluation posterior mean), so the cost and times are those of the scored masks
    options = predictor.mask_options(options)
    device = predictor.device

    def run(batch: torch.Tensor) -> None:
        predictor.probs(batch.to(device), options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # counting runs the prediction path on one slice: it is also the warm-up (allocator,
    # oneDNN's primitive cache), and it says how many calls a slice costs before timing
    cost = inference_cost(predictor.method, predictor.net, slices.shape[-1], options)
    slow = slow_above is not None and cost.evaluations > slow_above
    n_latency = min(1 if slow else latency_slices, slices.shape[0])
    batch = slices[:latency_slices] if slow else slices
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(n_latency):
        t0 = time.perf_counter()
        run(slices[i : i + 1])
        times.append(time.perf_counter() - t0)
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        run(batch)
        batch_seconds = time.perf_counter() - t0
    return {
        "sampler": options.sampler,
        "steps": options.steps,
        "samples": options.samples,
        "parameters": cost.parameters,
        "evaluations_per_image": cost.evaluations,
        "gflops_per_image": cost.gflops,
        "slow": slow,
        "latency_ms_per_image": 1000.0 * statistics.median(times),
        "latency_slices": n_latency,
        "throughput_images_per_s": batch.shape[0] / batch_seconds,
        "throughput_slices": batch.shape[0],
        "peak_memory_mib": (
            torch.cuda.max_memory_allocated(device) / 2**20
            if device.type == "cuda"
            else rss.peak / 2**20
        ),
        "memory_kind": "cuda max allocated" if device.type == "cuda" else "cpu resident set",
    }


def _datasets(cfg: BenchConfig, out: Path, quiet: bool) -> dict[str, Path]:
    found = {}
    for name in cfg.datasets:
        path = Path(name)
        if path.is_dir():
            found[path.name] = path
            continue
        target = out / "data" / name
        if not (target / "dataset.json").is_file():
            if not quiet:
                print(f"building {name} into {target}")
            build_builtin(name, target, force=True)
        found[name] = target
    return found


def _seconds_per_step(method: str, cfg: BenchConfig, data: Path, work: Path, device: str) -> float:
    """Training seconds per step of ``method`` on this machine, from a short timed probe."""
    probe = _train_config(
        cfg,
        method,
        steps=PROBE_UNTIMED + cfg.probe_steps + 1,
        val_every=10**6,
        checkpoint_every=10**6,
    )
    result = train(data, work / f"probe_{method}", probe, device=device, force=True, quiet=True)
    log = read_log(result.run_dir / "log.csv")
    # from the end of the untimed steps to the end of the step before the last: a run
    # validates at its last step, and a step's logged time includes its validation
    start, end = log[PROBE_UNTIMED - 1], log[-2]
    return (end["seconds"] - start["seconds"]) / cfg.probe_steps


def _train_fields(cfg: BenchConfig) -> dict:
    """The shared TrainConfig fields; threads default to the bench's own, so training and
    prediction run under the same thread setting."""
    return {"threads": torch.get_num_threads(), **cfg.train}


def _train_config(cfg: BenchConfig, method: str, **fields) -> TrainConfig:
    """The TrainConfig of ``method``: the shared fields, the method's own, then ``fields``."""
    return TrainConfig(**{**_train_fields(cfg), **METHODS[method], **fields})


def run_bench(
    cfg: BenchConfig, out: str | Path, *, device: str = "auto", force: bool = False, quiet=False
) -> dict:
    """Run the benchmark into ``out``; returns the record written to ``results.json``."""
    out = Path(out)
    if (out / "results.json").exists() and not force:
        raise OutputExistsError(out / "results.json")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ds_name, data in _datasets(cfg, out, quiet).items():
        per_step: dict[str, float] = {}
        if "time" in cfg.budgets:
            for method in {*cfg.methods, "medflowseg"}:
                per_step[method] = _seconds_per_step(
                    method, cfg, data, out / "probes" / ds_name, device
                )
        # by default the time MedFlowSeg needs for `steps` on this machine
        seconds = cfg.seconds
        if seconds is None and per_step:
            seconds = per_step["medflowseg"] * cfg.steps
        for budget in cfg.budgets:
            for method in cfg.methods:
                steps = cfg.steps
                if budget == "time":
                    steps = max(1, round(seconds / per_step[method]))
                slow: set[str] = set()  # settings found slow on the first seed: skipped after
                for seed in cfg.seeds:
                    run = out / "runs" / f"{ds_name}_{budget}_{method}_seed{seed}"
                    tcfg = _train_config(cfg, method, steps=steps, seed=seed)
                    if not quiet:
                        print(f"{ds_name} | {budget} budget | {method} seed {seed}: {steps} steps")
                    result = train(data, run, tcfg, device=device, force=True, quiet=True)
                    predictor = Predictor(result.final_checkpoint, device)
                    slices = _test_slices(data, predictor)
                    for label, fields in cfg.settings[method]:
                        if label in slow:
                            continue
                        scored = _score_setting(cfg, data, run, label, predictor, slices, fields)
                        if scored["slow"]:
                            slow.add(label)
                        rows.append(
                            {
                                "dataset": ds_name,
                                "budget": budget,
                                "method": method,
                                "setting": label,
                                "seed": seed,
                                "seeds_evaluated": 1 if scored["slow"] else len(cfg.seeds),
                                "network": {k: getattr(tcfg, k) for k in NETWORK_FIELDS},
                                "train_steps": steps,
                                "train_seconds": result.seconds,
                                "seconds_per_step_probe": per_step.get(method),
                                "budget_seconds": seconds if budget == "time" else None,
                                **scored,
                                "run": str(run.relative_to(out)),
                            }
                        )
    record = {
        "medflow": __version__,
        "torch": torch.__version__,
        "machine": {
            **machine_info(),
            "threads": torch.get_num_threads(),
            "device": str(device),
        },
        "config": dataclasses.asdict(cfg),
        "rows": rows,
    }
    table = markdown_table(rows)
    _plot_dice_vs_cost(rows, out / "dice_vs_cost.png")
    _plot_curves(rows, out, out / "curves.png")
    _write(out / "results.md", table.encode())
    _write(out / "results.json", (json.dumps(record, indent=2) + "\n").encode())
    return record


def _score_setting(
    cfg: BenchConfig,
    data: Path,
    run: Path,
    label: str,
    predictor: Predictor,
    slices: torch.Tensor,
    fields: dict,
) -> dict:
    """Predict the test split with one sampling setting into ``run/pred_<label>``, score it
    at native resolution into ``run/eval_<label>`` and measure it (:func:`measure_setting`)."""
    options = SamplingOptions(**fields)
    tag = label.replace(" ", "")
    pred, ev = run / f"pred_{tag}", run / f"eval_{tag}"
    predict_folder(
        predictor.path,
        data / "imagesTs",
        pred,
        device=str(predictor.device),
        force=True,
        quiet=True,
        options=options,
    )
    summary = evaluate_folders(pred, data / "labelsTs", ev, force=True)
    measured = measure_setting(
        predictor, slices, options, cfg.latency_slices, cfg.first_seed_only_above
    )
    return {**measured, "foreground": summary["foreground_mean"], "per_class": summary["mean"]}


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per dataset, budget, method and setting: means over the seeds it was
    evaluated on (Dice with its standard deviation and per-seed values), and how many seeds
    its method trained (``seeds_trained``; more than ``seeds`` for a slow setting)."""
    groups: dict[tuple, list[dict]] = {}
    trained: dict[tuple, set[int]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["budget"], r["method"], r["setting"]), []).append(r)
        trained.setdefault((r["dataset"], r["budget"], r["method"]), set()).add(r["seed"])
    out = []
    for (ds, budget, method, setting), rs in groups.items():
        dice = [r["foreground"]["dice"] for r in rs]

        def mean(key, rs=rs):
            return statistics.mean(r[key] for r in rs)

        out.append(
            {
                "dataset": ds,
                "budget": budget,
                "method": method,
                "setting": setting,
                "seeds": len(rs),
                "seeds_trained": len(trained[(ds, budget, method)]),
                "train_steps": rs[0]["train_steps"],
                "parameters": rs[0]["parameters"],
                "gflops_per_image": rs[0]["gflops_per_image"],
                "evaluations_per_image": rs[0]["evaluations_per_image"],
                "latency_ms_per_image": mean("latency_ms_per_image"),
                "throughput_images_per_s": mean("throughput_images_per_s"),
                "peak_memory_mib": max(r["peak_memory_mib"] for r in rs),
                "dice": statistics.mean(dice),
                "dice_sd": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                "dice_per_seed": dice,
                "iou": statistics.mean(r["foreground"]["iou"] for r in rs),
                "hd95": statistics.mean(r["foreground"]["hd95"] for r in rs),
                "assd": statistics.mean(r["foreground"]["assd"] for r in rs),
                "per_class_dice": {
                    c: statistics.mean(r["per_class"][c]["dice"] for r in rs)
                    for c in rs[0]["per_class"]
                },
            }
        )
    return out


def markdown_table(rows: list[dict]) -> str:
    """The aggregated rows as a Markdown table; a note under it when a setting was evaluated
    on fewer seeds than its method trained."""
    lines = [
        "| dataset | budget | method | setting | steps | seeds | params | GFLOPs/img | "
        "evals/img | latency ms/img | img/s | peak MiB | fg Dice | per class Dice | IoU | "
        "HD95 | ASSD |",
        "|" + "---|" * 17,
    ]
    fewer = False
    for a in aggregate(rows):
        per_class = ", ".join(f"{c} {d:.3f}" for c, d in a["per_class_dice"].items())
        sd = f" ± {a['dice_sd']:.3f}" if a["seeds"] > 1 else ""
        seeds = str(a["seeds"])
        if a["seeds"] < a["seeds_trained"]:
            seeds, fewer = f"{a['seeds']} of {a['seeds_trained']}*", True
        lines.append(
            f"| {a['dataset']} | {a['budget']} | {a['method']} | {a['setting']} | "
            f"{a['train_steps']} | {seeds} | {a['parameters']:,} | "
            f"{a['gflops_per_image']:.3f} | {a['evaluations_per_image']} | "
            f"{a['latency_ms_per_image']:.1f} | {a['throughput_images_per_s']:.1f} | "
            f"{a['peak_memory_mib']:.0f} | {a['dice']:.4f}{sd} | {per_class} | "
            f"{a['iou']:.4f} | {a['hd95']:.2f} | {a['assd']:.2f} |"
        )
    if fewer:
        lines += [
            "",
            "\\* evaluated on the first seed only: more network calls per image than the "
            "bench's `first_seed_only_above` (results.json, `config`); latency timed on one "
            "slice, throughput on `latency_slices` slices.",
        ]
    return "\n".join(lines) + "\n"


def _method_style(method: str) -> dict:
    """One colour and marker per bench method, the same in every panel and plot."""
    i = list(METHODS).index(method) if method in METHODS else len(METHODS)
    return {"color": f"C{i}", "marker": "os^vD<>"[i % 7]}


def _plot_dice_vs_cost(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    panels = sorted({(a["dataset"], a["budget"]) for a in agg})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (ds, budget) in zip(axes[0], panels, strict=True):
        labelled = set()
        for a in (a for a in agg if (a["dataset"], a["budget"]) == (ds, budget)):
            style = _method_style(a["method"])
            ax.errorbar(
                a["gflops_per_image"],
                a["dice"],
                yerr=a["dice_sd"],
                fmt=style["marker"],
                color=style["color"],
                capsize=3,
                label=None if a["method"] in labelled else a["method"],
            )
            labelled.add(a["method"])
            ax.annotate(
                a["setting"],
                (a["gflops_per_image"], a["dice"]),
                fontsize=6,
                color=style["color"],
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel("GFLOPs per image (log)")
        ax.set_ylabel("foreground Dice")
        ax.set_title(f"{ds}, equal {budget}")
        ax.legend(fontsize=7)
    _save(fig, path)


def _plot_curves(rows: list[dict], out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted({(r["dataset"], r["budget"], r["method"], r["seed"], r["run"]) for r in rows})
    panels = sorted({(ds, b) for ds, b, *_ in runs})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for ds, budget, method, seed, run in runs:
            if (ds, budget) != panel:
                continue
            log = read_log(out / run / "log.csv")
            pts = [
                (int(r["step"]), r["val_dice"])
                for r in log
                if not math.isnan(r.get("val_dice", math.nan))
            ]
            if pts:
                color = _method_style(method)["color"]
                ax.plot(*zip(*pts, strict=True), marker=".", color=color, label=f"{method} s{seed}")
        ax.set_xlabel("step")
        ax.set_ylabel("validation Dice")
        ax.set_title(f"{panel[0]}, equal {panel[1]}")
        ax.legend(fontsize=7)
    _save(fig, path)


def _write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _save(fig, path: Path) -> None:
    """Lay out, write as PNG (atomically) and close a figure."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _write(path, buf.getvalue())
