"""Train -> predict -> evaluate for several configurations and seeds; JSON plus a table.

Each run trains on ``--data`` with the default TrainConfig changed by ``--set`` overrides,
predicts the dataset's ``imagesTs`` with the final EMA checkpoint (one step unless
``--predict-steps`` says more), and evaluates against ``labelsTs`` at native resolution.
Independent runs go to separate single-thread processes, one per core (on the 2-core CI
machine two such runs finish in 505 s where two 2-thread runs in a row take 612 s). The runs
are arms of the one runner (:mod:`medflow.segmentation.protocol`), so a number here means
what the same number means in ``medflow bench``.

    python benchmarks/train_eval.py --data data/mni152 --out runs/bench \\
        --config default --config no-aug:augment=false --seeds 0 1 2 3 \\
        --results benchmarks/results/mni152_seeds.json

A ``--config`` is ``NAME`` or ``NAME:key=value,key=value`` (TrainConfig fields; booleans as
true/false, tuples as 16/32/64). With ``--reuse``, a run whose folder already holds a
``result.json`` for the same name, seed, overrides and predict steps is read back instead of
trained again, so a sweep that was killed can be finished and extended (a run's
``result.json`` under ``--out/runs``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path


def parse_config(text: str) -> tuple[str, dict]:
    from medflow.segmentation.config import TrainConfig

    name, _, rest = text.partition(":")
    kinds = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in kinds:
            raise SystemExit(f"unknown TrainConfig field {key!r} in --config {text!r}")
        default = kinds[key]
        if isinstance(default, bool):
            overrides[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, tuple):
            overrides[key] = tuple(int(v) for v in value.split("/"))
        elif isinstance(default, float):
            overrides[key] = float(value)
        elif isinstance(default, int) or default is None:
            overrides[key] = int(value)
        else:
            overrides[key] = value
    return name, overrides


def arms(configs: list[tuple[str, dict]], data: Path, predict_steps: list[int]) -> list:
    """One arm per configuration: a flow model predicts with each of ``predict_steps`` Euler
    steps, any other model once; every run on one thread (the runs go one per core)."""
    from medflow.segmentation.inference import SamplingOptions
    from medflow.segmentation.protocol import Arm, Setting

    out = []
    for name, overrides in configs:
        flow = overrides.get("model", "medflowseg") == "medflowseg"
        settings = (
            tuple(
                Setting(f"steps{n}", SamplingOptions(sampler="euler", steps=n))
                for n in predict_steps
            )
            if flow
            else (Setting("steps1"),)
        )
        fields = {**overrides, "threads": 1}
        out.append(Arm(name, data, fields, settings, tags={"config": name, "overrides": overrides}))
    return out


def table(configs: list[tuple[str, dict]], rows: list[dict]) -> str:
    lines = [
        "| config | predict | seeds | fg Dice mean ± std | per seed | IoU mean | "
        "train s (1 thread) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, _ in configs:
        mine = [r for r in rows if r["config"] == name]
        for setting in dict.fromkeys(r["setting"] for r in mine):
            rs = [r for r in mine if r["setting"] == setting]
            d = [r["foreground"]["dice"] for r in rs]
            iou = [r["foreground"]["iou"] for r in rs]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            lines.append(
                f"| {name} | {setting} | {len(d)} | {statistics.mean(d):.4f} ± {sd:.4f} | "
                f"{', '.join(f'{v:.4f}' for v in d)} | {statistics.mean(iou):.4f} | "
                f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs")
    parser.add_argument("--config", action="append", default=[], help="NAME[:k=v,...]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--predict-steps", type=int, nargs="+", default=[1])
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--results", type=Path, required=True, help="JSON to write")
    parser.add_argument(
        "--reuse", action="store_true", help="read back runs already finished in --out"
    )
    args = parser.parse_args()
    configs = [parse_config(c) for c in (args.config or ["default"])]
    from medflow.segmentation.protocol import results_record, run_protocol

    rows = run_protocol(
        arms(configs, args.data, args.predict_steps),
        args.seeds,
        args.out,
        reuse=args.reuse,
        jobs=args.jobs,
    )
    config = {"command": " ".join(sys.argv), "cores": len(os.sched_getaffinity(0))}
    text = table(configs, rows)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    record = results_record(rows, config, table=text)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
