"""Train -> predict -> evaluate for several configurations and seeds; JSON plus a table.

Each run trains on ``--data`` with the default TrainConfig changed by ``--set`` overrides,
predicts the dataset's ``imagesTs`` with the final EMA checkpoint (one step unless
``--predict-steps`` says more), and evaluates against ``labelsTs`` at native resolution.
Independent runs go to separate single-thread processes, one per core (on the 2-core CI
machine two such runs finish in 505 s where two 2-thread runs in a row take 612 s).

    python benchmarks/train_eval.py --data data/mni152 --out runs/bench \\
        --config default --config no-aug:augment=false --seeds 0 1 2 3 \\
        --results benchmarks/results/mni152_seeds.json

A ``--config`` is ``NAME`` or ``NAME:key=value,key=value`` (TrainConfig fields; booleans as
true/false, tuples as 16/32/64). With ``--reuse``, a run whose folder already holds a
``result.json`` for the same name, seed, overrides and predict steps is read back instead of
trained again, so a sweep that was killed can be finished and extended.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
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


def steps_to_predict(job: dict) -> list[int]:
    """Euler steps to predict with: those asked for a flow model, one call otherwise."""
    flow = job["overrides"].get("model", "medflowseg") == "medflowseg"
    return job["predict_steps"] if flow else [1]


def finished(job: dict) -> dict | None:
    """The run's earlier record when it matches the job exactly, else None."""
    path = Path(job["run"]) / "result.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    overrides = json.loads(json.dumps(job["overrides"]))  # tuples as lists, like the file
    same = (
        record.get("config") == job["name"]
        and record.get("seed") == job["seed"]
        and record.get("overrides") == overrides
    )
    if same and all(str(n) in record.get("predict", {}) for n in steps_to_predict(job)):
        return record
    return None


def run_one(job: dict) -> dict:
    if job["reuse"] and (record := finished(job)) is not None:
        return record
    import torch

    from medflow.metrics.summary import evaluate_folders
    from medflow.segmentation.config import TrainConfig
    from medflow.segmentation.predict import SamplingOptions, predict_folder
    from medflow.segmentation.train import train

    torch.set_num_threads(job["threads"])
    data, run = Path(job["data"]), Path(job["run"])
    cfg = TrainConfig(**{**job["overrides"], "seed": job["seed"], "threads": job["threads"]})
    t0 = time.perf_counter()
    result = train(data, run, cfg, force=True, quiet=True)
    train_s = time.perf_counter() - t0
    record = {
        "config": job["name"],
        "seed": job["seed"],
        "overrides": job["overrides"],
        "train_seconds": round(train_s, 1),
        "best_val_dice": result.best_val_dice,
        "best_step": result.best_step,
        "predict": {},
    }
    for n in steps_to_predict(job):
        pred = run / f"pred_steps{n}"
        t1 = time.perf_counter()
        predict_folder(
            result.final_checkpoint,
            data / "imagesTs",
            pred,
            force=True,
            quiet=True,
            options=SamplingOptions(steps=n),
        )
        predict_s = time.perf_counter() - t1
        summary = evaluate_folders(pred, data / "labelsTs", run / f"eval_steps{n}", force=True)
        record["predict"][str(n)] = {
            "predict_seconds": round(predict_s, 2),
            "foreground_dice": summary["foreground_mean"]["dice"],
            "foreground_iou": summary["foreground_mean"]["iou"],
            "dice": {c: m["dice"] for c, m in summary["mean"].items()},
        }
    # each run keeps its own record, so a long sweep that dies keeps what it finished
    (run / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


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
    jobs = [
        {
            "name": name,
            "overrides": ov,
            "seed": seed,
            "data": str(args.data),
            "run": str(args.out / f"{name}_seed{seed}"),
            "threads": 1,
            "predict_steps": args.predict_steps,
            "reuse": args.reuse,
        }
        for name, ov in configs
        for seed in args.seeds
    ]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(run_one, jobs))
    import torch

    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "torch": torch.__version__,
                "cores": len(os.sched_getaffinity(0)),
                "runs": records,
            },
            indent=2,
        )
        + "\n"
    )

    print(
        "| config | predict steps | seeds | fg Dice mean ± std | per seed | IoU mean | "
        "train s (1 thread) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, _ in configs:
        rows = [r for r in records if r["config"] == name]
        for n in rows[0]["predict"]:
            d = [r["predict"][n]["foreground_dice"] for r in rows]
            iou = [r["predict"][n]["foreground_iou"] for r in rows]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            print(
                f"| {name} | {n} | {len(d)} | {statistics.mean(d):.4f} ± {sd:.4f} | "
                f"{', '.join(f'{v:.4f}' for v in d)} | {statistics.mean(iou):.4f} | "
                f"{statistics.mean(r['train_seconds'] for r in rows):.0f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
