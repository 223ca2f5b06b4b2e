"""What shortcut jumps cost in training: seconds per step with and without them, same run.

    .venv/bin/python benchmarks/shortcut_cost.py --data data/mni152 \\
        --out benchmarks/results/shortcut_cost.json

Trains MedFlowSeg ``--steps`` steps (no validation; the timed steps write no checkpoint)
with ``shortcut_fraction`` 0.25 (the default) and 0, alternating ``--repeats`` times so that
drifts of the machine's speed fall on both, and reports the median seconds per step of each
and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from medflow.engine.runtime import machine_info
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.train import train

ARMS = {"shortcut 0.25 (default)": 0.25, "no shortcut": 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    seconds: dict[str, list[float]] = {name: [] for name in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, fraction in ARMS.items():
                cfg = TrainConfig(
                    size=args.size,
                    steps=args.steps,
                    threads=args.threads,
                    shortcut_fraction=fraction,
                    val_fraction=0.0,  # no validation inside the timed steps
                    checkpoint_every=10 * args.steps,
                    seed=r,
                )
                result = train(args.data, Path(tmp) / f"run{r}_{fraction}", cfg, quiet=True)
                seconds[name].append(result.seconds / args.steps)
    per_step = {name: statistics.median(v) for name, v in seconds.items()}
    ratio = per_step["shortcut 0.25 (default)"] / per_step["no shortcut"]
    record = {
        "command": "benchmarks/shortcut_cost.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "size": args.size,
        "batch_size": TrainConfig().batch_size,
        "seconds_per_step": seconds,
        "median_seconds_per_step": per_step,
        "ratio_shortcut_over_none": ratio,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for name, v in per_step.items():
        print(f"{name:26s} {v:.3f} s/step  ({', '.join(f'{x:.3f}' for x in seconds[name])})")
    print(f"ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
