"""Small targets at the issue's budget: mni152-lesions trained for 15 CPU-minutes (one thread,
``budget_clock="cpu"``), planned for this machine (``plan="auto"``: the CPU plan's batch), by each
method named, then scored per voxel (Dice over the test cases, lesion-free cases included)
and per lesion (F1 pooled over the test cases).

    python benchmarks/lesions.py --work /tmp/lesions --arms medflowseg unet --budget 15m \\
        --seeds 0 --results benchmarks/results/lesions.json

Arms (``--arms``): ``medflowseg`` (the default method), ``unet`` (the same backbone trained
with cross-entropy + Dice alone), and ``medflowseg-2.5d`` / ``unet-2.5d`` (one neighbouring
slice on each side as extra input channels, ``context_slices=1``). Runs go one per core, one
thread each; ``--reuse`` reads finished runs back.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ARMS = {
    "medflowseg": {},
    "unet": {"model": "unet"},
    "medflowseg-2.5d": {"context_slices": 1},
    "unet-2.5d": {"model": "unet", "context_slices": 1},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=["medflowseg", "unet"])
    ap.add_argument("--budget", default="15m")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--reuse", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from planned import lesion_scores

    from medflow.data.builtin import build
    from medflow.engine.checkpoint import load_checkpoint
    from medflow.segmentation.protocol import Arm, results_record, run_protocol, write_results

    data = args.work / "data" / "mni152-lesions"
    if not (data / "dataset.json").is_file():
        build("mni152-lesions", data, force=True)
    # CPU time of the run's one thread: jobs sharing the machine do not shorten it
    base = {
        "plan": "auto",
        "time_budget": args.budget,
        "budget_clock": "cpu",
        "steps": 10**6,
        "threads": 1,
    }
    arms = [Arm(a, data, {**base, **ARMS[a]}, tags={"method": a}) for a in args.arms]
    rows = run_protocol(arms, args.seeds, args.work, reuse=args.reuse, jobs=args.jobs)
    for r in rows:
        cfg = load_checkpoint(args.work / r["checkpoint"])["config"]
        r["batch"], r["patch"] = cfg["batch_size"], cfg["patch"]
        r["lesions"] = lesion_scores(args.work / r["run"] / "pred_default", data / "labelsTs")
    text = table(rows)
    print(text, end="")
    record = results_record(rows, {"command": " ".join(sys.argv), "budget": args.budget})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.results.parent, record, text, name=args.results.stem)
    return 0


def table(rows: list[dict]) -> str:
    """One line per run: steps, Dice over the test cases, lesion-wise detection."""
    lines = [
        "| arm | seed | steps | batch | patch | Dice | lesion F1 | precision | recall | "
        "tp / fn / fp | train CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        les = r["lesions"]
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['train_steps']} | {r['batch']} | "
            f"{'x'.join(map(str, r['patch']))} | {r['foreground']['dice']:.4f} | "
            f"{les['f1']:.3f} | {les['precision']:.3f} | {les['recall']:.3f} | "
            f"{les['tp']} / {les['fn']} / {les['fp']} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
