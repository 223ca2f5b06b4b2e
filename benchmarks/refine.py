"""Does refinement pay? MedFlowSeg as it is, with self-conditioning, with recycling, with
both, and the same-backbone UNet, trained on the same budget and scored at 1, 2, 4 and 8
Euler steps and with the refine sampler (issue 15; docs/MODEL.md, section 7.2).

    python benchmarks/refine.py --out runs/refine --seeds 0 1 2 --train-steps 300 --jobs 2

trains every condition with every seed on ``mni152-tissue`` at 96 x 96 (built into
``--out/data`` unless ``--data`` names a copy), predicts its test cases with the final EMA
checkpoint once per setting and scores them (the arms of :mod:`medflow.segmentation.protocol`,
so a Dice here means what it means in ``medflow bench`` and ``benchmarks/train_eval.py``), and
writes ``refine.json`` and ``refine.md`` into ``--results`` (default ``benchmarks/results``).
A UNet is one network call whatever the steps, so it is scored once. ``--time-budget 15m``
trains every condition for the same CPU time (``budget_clock="cpu"``) instead of the same
steps (self-conditioning and recycling cost a pass without gradient on part of each
batch). The JSON's ``summary`` answers the issue's two questions: is the mean Dice of each
sampler non-decreasing in the steps, and how far is the best flow setting above the UNet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Condition:
    """One model to train: its name and the TrainConfig fields it changes."""

    name: str
    fields: dict = field(default_factory=dict)
    flow: bool = True


CONDITIONS = (
    Condition("medflowseg"),
    Condition("self-cond", {"self_condition": True}),
    Condition("recycle", {"recycle_fraction": 0.5}),
    Condition("self-cond+recycle", {"self_condition": True, "recycle_fraction": 0.5}),
    Condition("unet", {"model": "unet"}, flow=False),
)


# the flow + UNet ensemble's arm (scored when both are among the conditions)
ENSEMBLE = "medflowseg+unet"


def settings(condition: Condition, steps: list[int], starts: list[float]) -> tuple:
    """Euler at every step count, refine at every step count above 1 and start."""
    from medflow.segmentation.inference import SamplingOptions
    from medflow.segmentation.protocol import Setting

    if not condition.flow:
        return (Setting("one call"),)
    euler = [Setting(f"euler-{n}", SamplingOptions(sampler="euler", steps=n)) for n in steps]
    refine = [
        Setting(f"refine-{n} t0={s:g}", SamplingOptions(sampler="refine", steps=n, refine_start=s))
        for s in starts
        for n in steps
        if n > 1
    ]
    return tuple(euler + refine)


def arms(conditions, data: Path, budget: dict, size: int, steps, starts) -> list:
    """One arm per condition, each run on one thread (the runs go one per core)."""
    from medflow.segmentation.protocol import Arm

    return [
        Arm(
            c.name,
            data,
            {**budget, **c.fields, "size": size, "threads": 1},
            settings(c, steps, starts),
            tags={"condition": c.name, "fields": c.fields},
        )
        for c in conditions
    ]


def _dice(rows: list[dict]) -> list[float]:
    return [r["foreground"]["dice"] for r in rows]


def _family(setting: str) -> tuple[str, int] | None:
    """``"refine-4 t0=0.5"`` -> ``("refine t0=0.5", 4)``; ``"euler-2"`` -> ``("euler", 2)``."""
    head, _, rest = setting.partition(" ")
    name, _, n = head.partition("-")
    if not n.isdigit():
        return None
    return (f"{name} {rest}".strip(), int(n))


def summary(rows: list[dict]) -> dict:
    """Per flow condition and sampler, the mean Dice by steps and whether it never drops;
    the best flow setting against the UNet's mean (the goal: at least 1 point above)."""
    means: dict[tuple[str, str], float] = {}
    for key in dict.fromkeys((r["arm"], r["setting"]) for r in rows):
        means[key] = statistics.mean(_dice([r for r in rows if (r["arm"], r["setting"]) == key]))
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for (arm, setting), dice in means.items():
        fam = _family(setting)
        if fam is not None:
            curves.setdefault(arm, {}).setdefault(fam[0], {})[fam[1]] = dice
    out: dict = {"curves": {}, "non_decreasing": {}}
    for arm, by_sampler in curves.items():
        for sampler, curve in by_sampler.items():
            # refine's one step is euler-1: its curve starts there
            if sampler.startswith("refine") and 1 in by_sampler.get("euler", {}):
                curve = {1: by_sampler["euler"][1], **curve}
            ordered = [curve[n] for n in sorted(curve)]
            out["curves"].setdefault(arm, {})[sampler] = dict(sorted(curve.items()))
            out["non_decreasing"].setdefault(arm, {})[sampler] = all(
                b >= a for a, b in zip(ordered, ordered[1:])
            )
    unet = [d for (arm, _), d in means.items() if arm == "unet"]
    # the ensemble is a reference point, not a flow setting
    flow = {k: d for k, d in means.items() if k[0] != "unet" and k[1] != "ensemble"}
    ensemble = [d for (_, setting), d in means.items() if setting == "ensemble"]
    if ensemble and unet:
        out["ensemble"] = ensemble[0]
        out["ensemble_margin_points"] = 100 * (ensemble[0] - unet[0])
    if unet and flow:
        (arm, setting), best = max(flow.items(), key=lambda kv: kv[1])
        out["best_flow"] = {"arm": arm, "setting": setting, "dice": best}
        out["unet"] = unet[0]
        out["margin_points"] = 100 * (best - unet[0])
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| condition | predict | seeds | fg Dice mean ± std | per seed | train steps | "
        "train s (1 thread) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys((r["arm"], r["setting"]) for r in rows):
        rs = [r for r in rows if (r["arm"], r["setting"]) == key]
        d = _dice(rs)
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        lines.append(
            f"| {key[0]} | {key[1]} | {len(d)} | {statistics.mean(d):.4f} ± {sd:.4f} | "
            f"{', '.join(f'{v:.4f}' for v in d)} | "
            f"{statistics.mean(r['train_steps'] for r in rs):.0f} | "
            f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs")
    parser.add_argument("--data", type=Path, default=None, help="default: build mni152-tissue")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--train-steps", type=int, default=300)
    budget.add_argument("--time-budget", default="", help="e.g. 15m: equal CPU time, not steps")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--predict-steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--refine-starts", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    names = [c.name for c in CONDITIONS]
    parser.add_argument("--conditions", nargs="+", default=names, choices=names)
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="refine", help="results file name")
    parser.add_argument("--reuse", action="store_true", help="read back finished runs")
    args = parser.parse_args()
    from medflow.data.builtin import built
    from medflow.segmentation.protocol import (
        ensemble_rows,
        results_record,
        run_protocol,
        write_results,
    )

    # a time budget on the CPU clock: jobs sharing the machine do not eat it
    spend = (
        {"time_budget": args.time_budget, "budget_clock": "cpu"}
        if args.time_budget
        else {"steps": args.train_steps}
    )
    chosen = [c for c in CONDITIONS if c.name in args.conditions]
    data = args.data or built("mni152-tissue", args.out / "data" / "mni152-tissue")
    protocol = arms(chosen, data, spend, args.size, args.predict_steps, args.refine_starts)
    rows = run_protocol(protocol, args.seeds, args.out, reuse=args.reuse, jobs=args.jobs)
    if {"medflowseg", "unet"} <= {c.name for c in chosen}:
        # the reference point of issue 15: one-step MedFlowSeg and the UNet, soft masks averaged
        rows += ensemble_rows(rows, ["medflowseg", "unet"], ENSEMBLE, data, args.out)
    config = {
        "command": " ".join(sys.argv),
        "cores": len(os.sched_getaffinity(0)),
        "data": str(data),
        "budget": spend,
        "size": args.size,
    }
    text = table(rows)
    record = results_record(rows, config, table=text, summary=summary(rows))
    args.results.mkdir(parents=True, exist_ok=True)
    write_results(args.results, record, text, name=args.name)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
