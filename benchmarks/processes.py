"""One process with all cores' threads, or one single-thread process per core under torchrun?

Trains the default MedFlowSeg network for ``--warmup + --steps`` steps of the same global
batch (16 slices at 96 x 96) on ``--data`` with ``medflow train``, once as one process with
one thread per core and once as ``torchrun --standalone --nproc_per_node <cores>`` with one
thread per process (and, on machines with 4 or more cores, 2 processes of half the cores
each). Throughput is read from the run's ``log.csv`` (seconds since the loop started, per
step): the time from the end of step ``--warmup`` to the end of the last step, so process
start-up, data loading and the first steps (allocator and oneDNN caches) are excluded.
Validation is off (``--val-fraction 0``) and the one checkpoint comes after the last timed
step. Configurations alternate over ``--repeats`` rounds so that drift in the machine's load
hits both; the median is reported.

    python benchmarks/processes.py [--data data/mni152] [--steps 30] [--repeats 3]

``--data`` defaults to data/mni152, built with ``medflow datasets build mni152-tissue`` into
a temporary folder when absent. Writes ``benchmarks/results/processes.json`` and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from medflow.engine.distributed import torchrun_command
from medflow.engine.runtime import machine_info

BATCH = 16


def configurations(cores: int, batch: int) -> list[tuple[int, int]]:
    """(processes, threads per process) pairs that use every core once."""
    pairs = [(1, cores), (cores, 1)]
    if cores >= 4:
        pairs.insert(1, (2, cores // 2))
    return [(p, t) for p, t in dict.fromkeys(pairs) if batch % p == 0]


def train_command(processes: int, threads: int, data: Path, out: Path, args) -> list[str]:
    total = args.warmup + args.steps
    argv = [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--size",
        str(args.size),
        "--batch-size",
        str(BATCH),
        "--steps",
        str(total),
        "--threads",
        str(threads),
        "--val-fraction",
        "0",
        "--checkpoint-every",
        str(total),
        "--quiet",
        "--force",
    ]
    if processes == 1:
        return [sys.executable, "-m", "medflow.cli", *argv]
    return torchrun_command(processes, argv)


def timed_seconds(log_csv: Path, warmup: int) -> tuple[float, int]:
    """Seconds from the end of step ``warmup`` to the end of the last step, and the steps."""
    rows = list(csv.DictReader(log_csv.read_text().splitlines()))
    seconds = {int(r["step"]): float(r["seconds"]) for r in rows}
    last = max(seconds)
    return seconds[last] - seconds[warmup], last - warmup


def measure(processes: int, threads: int, data: Path, work: Path, args) -> dict:
    out = work / f"p{processes}_t{threads}"
    proc = subprocess.run(
        train_command(processes, threads, data, out, args), capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"{processes} x {threads} failed:\n{proc.stderr[-3000:]}")
    seconds, steps = timed_seconds(out / "log.csv", args.warmup)
    return {"seconds": seconds, "steps": steps, "steps_per_s": steps / seconds}


def find_data(path: Path | None, work: Path) -> Path:
    if path is not None:
        return path
    if Path("data/mni152/dataset.json").is_file():
        return Path("data/mni152")
    built = work / "mni152"
    subprocess.run(
        [sys.executable, "-m", "medflow.cli", "datasets", "build", "mni152-tissue", "--out", built],
        check=True,
    )
    return built


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="dataset (default data/mni152)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/processes.json"))
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be >= 1")
    cores = len(os.sched_getaffinity(0))
    pairs = configurations(cores, BATCH)
    runs: dict[str, list[dict]] = {f"{p}x{t}": [] for p, t in pairs}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = find_data(args.data, work)
        for _ in range(args.repeats):
            for p, t in pairs:
                runs[f"{p}x{t}"].append(measure(p, t, data, work, args))
    summary = {
        key: {
            "processes": p,
            "threads_per_process": t,
            "median_steps_per_s": statistics.median(r["steps_per_s"] for r in runs[key]),
            "runs": runs[key],
        }
        for (p, t), key in zip(pairs, runs)
    }
    base = summary[f"1x{cores}"]["median_steps_per_s"]
    for entry in summary.values():
        entry["median_slices_per_s"] = entry["median_steps_per_s"] * BATCH
        entry["speedup_over_one_process"] = entry["median_steps_per_s"] / base
    record = {
        "machine": machine_info(),
        "data": str(data),
        "size": args.size,
        "global_batch": BATCH,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "results": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"| processes x threads | steps/s | slices/s | vs 1 process x {cores} threads |")
    print("|---|---|---|---|")
    for key, entry in summary.items():
        print(
            f"| {key} | {entry['median_steps_per_s']:.3f} | {entry['median_slices_per_s']:.1f} "
            f"| {entry['speedup_over_one_process']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
