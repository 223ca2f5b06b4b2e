"""The bench as arms of the one runner (:mod:`medflow.segmentation.protocol`): datasets,
the time budget's probes, one arm per budget and method, and the results folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from medflow.data.builtin import build as build_builtin
from medflow.engine.logs import read_log
from medflow.errors import OutputExistsError
from medflow.segmentation.bench.config import (
    METHODS,
    NETWORK_FIELDS,
    PROBE_UNTIMED,
    BenchConfig,
)
from medflow.segmentation.bench.measure import measure_setting, scored_slices
from medflow.segmentation.bench.plots import plot_curves, plot_dice_vs_cost
from medflow.segmentation.bench.table import markdown_table
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.inference import SamplingOptions
from medflow.segmentation.predict import Predictor
from medflow.segmentation.protocol import Arm, Setting, results_record, run_protocol, write_results
from medflow.segmentation.train import train


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
    cfg: BenchConfig,
    out: str | Path,
    *,
    device: str = "auto",
    force: bool = False,
    quiet=False,
    reuse: bool = False,
) -> dict:
    """Run the benchmark into ``out``; returns the record written to ``results.json``. With
    ``reuse``, a run already finished in ``out`` with the same arm (data, training fields,
    settings) is read back instead of trained again (an interrupted bench resumes; a bench
    of fewer datasets or methods tabulates part of an earlier one)."""
    out = Path(out)
    if (out / "results.json").exists() and not force:
        raise OutputExistsError(out / "results.json")
    out.mkdir(parents=True, exist_ok=True)
    arms = []
    for ds_name, data in _datasets(cfg, out, quiet).items():
        arms += _arms(cfg, ds_name, data, out, device)
    say = (lambda _: None) if quiet else print
    rows = run_protocol(arms, cfg.seeds, out, device=device, say=say, reuse=reuse)
    _add_curves(rows, out)
    record = results_record(rows, dataclasses.asdict(cfg), str(device))
    plot_dice_vs_cost(rows, out / "dice_vs_cost.png")
    plot_curves(rows, out, out / "curves.png")
    write_results(out, record, markdown_table(rows))
    return record


def _arms(cfg: BenchConfig, ds_name: str, data: Path, out: Path, device: str) -> list[Arm]:
    """One arm per budget and method on one dataset. The time budget's steps come from a
    short timed probe of each method (and of MedFlowSeg, whose time for ``cfg.steps`` is the
    default budget)."""
    per_step: dict[str, float] = {}
    if "time" in cfg.budgets:
        for method in {*cfg.methods, "medflowseg"}:
            per_step[method] = _seconds_per_step(
                method, cfg, data, out / "probes" / ds_name, device
            )
    seconds = cfg.seconds
    if seconds is None and per_step:
        seconds = per_step["medflowseg"] * cfg.steps
    measure = _measure(cfg)
    arms = []
    for budget in cfg.budgets:
        for method in cfg.methods:
            fields = {**_train_fields(cfg), **METHODS[method], **_length(cfg, budget, method)}
            if budget == "time":
                fields["steps"] = max(1, round(seconds / per_step[method]))
            settings = tuple(
                Setting(label, SamplingOptions(**f)) for label, f in cfg.settings[method]
            )
            tags = {
                "dataset": ds_name,
                "budget": budget,
                "method": method,
                "network": {k: getattr(TrainConfig(**fields), k) for k in NETWORK_FIELDS},
                "seconds_per_step_probe": per_step.get(method),
                "budget_seconds": seconds if budget == "time" else None,
                "plateau_cap": cfg.plateau_cap if budget == "plateau" else None,
            }
            name = f"{ds_name}_{budget}_{method}"
            arms.append(Arm(name, data, fields, settings, tags=tags, measure=measure))
    return arms


def _length(cfg: BenchConfig, budget: str, method: str) -> dict:
    """How long ``budget`` trains: ``cfg.steps``, or for the plateau budget until the
    validation Dice stalls with the learning rate halved ``plateau_reductions`` times
    (``plateau_cap`` steps at most)."""
    if budget != "plateau":
        return {"steps": cfg.steps}
    reduce = cfg.plateau_reductions > 0
    return {
        "steps": cfg.plateau_cap,
        "lr_schedule": "plateau" if reduce else "constant",
        "plateau_patience": cfg.plateau_patience,
        **({"plateau_reductions": cfg.plateau_reductions} if reduce else {}),
    }


def _add_curves(rows: list[dict], out: Path) -> None:
    """Each plateau-budget row gets its run's validation curve (``[step, Dice]`` pairs) and
    whether it stalled before the cap (``plateaued``; False: it was still rising)."""
    for r in rows:
        if r["budget"] != "plateau":
            continue
        log = read_log(out / r["run"] / "log.csv")
        r["curve"] = [
            [int(x["step"]), x["val_dice"]] for x in log if x["val_dice"] == x["val_dice"]
        ]
        r["plateaued"] = r["train_steps"] < r["plateau_cap"]


def _measure(cfg: BenchConfig):
    """The bench's measurements of a setting, on the test slices of the arm's data."""

    def measure(predictor: Predictor, arm: Arm, setting: Setting) -> dict:
        slices = scored_slices(Path(arm.test or arm.data), predictor)
        return measure_setting(
            predictor, slices, setting.options, cfg.latency_slices, cfg.first_seed_only_above
        )

    return measure
