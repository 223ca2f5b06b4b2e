"""Planned runs against the fixed 96 x 96 resize, at equal training time, over seeds.

For every embedded dataset named (built into ``<work>/data``), two arms of the one runner
(:mod:`medflow.segmentation.protocol`): ``fixed``, today's default (every slice resized to
96 x 96), and ``planned`` (``TrainConfig(plan="auto")``: slices resampled to the planned
spacing, patches with foreground oversampling, sliding-window prediction at native
resolution). Everything else is the default config; both train for the same ``--budget``
(``TrainConfig.time_budget``: the steps that fit it on this machine), or with ``--budget
none`` for the same ``--steps``. Binary sets
(mni152-lesions) also get lesion-wise detection (:mod:`medflow.metrics.lesions`, pooled over
the test cases).

    python benchmarks/planned.py --work /tmp/planned --datasets dsb-nuclei mni152-tissue \\
        --seeds 0 1 2 --budget 4m --results benchmarks/results/planned.json

Runs go one per core, one thread each (``--jobs``); ``--reuse`` reads finished runs back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path


def lesion_scores(pred: Path, ref: Path) -> dict:
    """Pooled lesion-wise detection of class 1 over the label files of ``ref``."""
    from medflow.data.io import read_label
    from medflow.metrics.lesions import lesion_detection, pool

    found = []
    for path in sorted(ref.glob("*.nii.gz")):
        r = read_label(path)
        p = read_label(pred / path.name).array
        found.append(lesion_detection(p, r.array, 1, spacing=r.geometry.spacing))
    total = pool(found)
    return {"f1": total.f1, "precision": total.precision, "recall": total.recall,
            "tp": total.tp, "fn": total.fn, "fp": total.fp}  # fmt: skip


def build_arms(work: Path, names: list[str], steps: int, budget: str) -> list:
    from medflow.data.builtin import build
    from medflow.segmentation.protocol import Arm

    arms = []
    for name in names:
        data = work / "data" / name
        if not (data / "dataset.json").is_file():
            build(name, data, force=True)
        for arm, fields in (("fixed", {}), ("planned", {"plan": "auto"})):
            tags = {"dataset": name, "mode": arm}
            length = (
                {"steps": steps} if budget == "none" else {"steps": 10**6, "time_budget": budget}
            )
            arms.append(Arm(f"{name}_{arm}", data, {**length, **fields}, tags=tags))
    return arms


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | mode | seeds | fg Dice mean ± sd | per seed | lesion F1 | train s | "
        "steps | patch / size | batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys((r["dataset"], r["mode"]) for r in rows):
        rs = [r for r in rows if (r["dataset"], r["mode"]) == key]
        d = [r["foreground"]["dice"] for r in rs]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        f1 = [r["lesions"]["f1"] for r in rs if "lesions" in r]
        lesion = f"{statistics.mean(f1):.3f}" if f1 else ""
        lines.append(
            f"| {key[0]} | {key[1]} | {len(d)} | {statistics.mean(d):.4f} ± {sd:.4f} | "
            f"{', '.join(f'{v:.4f}' for v in d)} | {lesion} | "
            f"{statistics.mean(r['train_seconds'] for r in rs):.0f} | "
            f"{statistics.mean(r['train_steps'] for r in rs):.0f} | {rs[0]['shape']} | "
            f"{rs[0]['batch']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--datasets", nargs="+", default=["dsb-nuclei", "mni152-tissue"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="with --budget none")
    ap.add_argument("--budget", default="4m", help="training time per run, or none")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--reuse", action="store_true")
    args = ap.parse_args()

    from medflow.engine.checkpoint import load_checkpoint
    from medflow.segmentation.protocol import results_record, run_protocol

    # one thread per run, one run per core
    arms = build_arms(args.work, args.datasets, args.steps, args.budget)
    arms = [type(a)(a.name, a.data, {**a.train, "threads": 1}, tags=a.tags) for a in arms]
    rows = run_protocol(arms, args.seeds, args.work, reuse=args.reuse, jobs=args.jobs)
    for r in rows:
        ckpt = load_checkpoint(args.work / r["checkpoint"])
        cfg = ckpt["config"]
        r["shape"] = "x".join(map(str, cfg["patch"] or [cfg["size"]] * 2))
        r["batch"] = cfg["batch_size"]
        r["plan"] = ckpt.get("plan")
        if r["dataset"] == "mni152-lesions":
            data = args.work / "data" / r["dataset"]
            r["lesions"] = lesion_scores(args.work / r["run"] / "pred_default", data / "labelsTs")
    text = table(rows)
    config = {"command": " ".join(sys.argv), "budget": args.budget, "seeds": args.seeds}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results_record(rows, config, table=text), indent=2) + "\n")
    args.results.with_suffix(".md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
