"""Does a smaller batch than the plan's help a short CPU run on mni152-lesions? The plan as
planned (batch 45, nnU-Net's 5 % rule) against the same plan with batch 8, at equal time.

    python benchmarks/lesion_batch.py --work /tmp/lesion_batch --budget 4m \\
        --results benchmarks/results/lesion_batch.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--budget", default="4m")
    ap.add_argument("--batches", type=int, nargs="+", default=[45, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--results", type=Path, required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from planned import lesion_scores

    from medflow.data.builtin import build
    from medflow.data.fingerprint import fingerprint_dataset
    from medflow.data.layout import load_dataset
    from medflow.data.plan import plan_from_fingerprint, write_plan
    from medflow.segmentation.protocol import Arm, results_record, run_protocol

    data = args.work / "data" / "mni152-lesions"
    if not (data / "dataset.json").is_file():
        build("mni152-lesions", data, force=True)
    fingerprint = fingerprint_dataset(load_dataset(data))
    arms = []
    for batch in args.batches:
        plan = plan_from_fingerprint(fingerprint, overrides={"batch_size": batch})
        path = write_plan(args.work / f"plans_batch{batch}.json", plan)
        fields = {"plan": str(path), "time_budget": args.budget, "steps": 10**6, "threads": 1}
        arms.append(Arm(f"batch{batch}", data, fields, tags={"batch": batch}))
    rows = run_protocol(arms, args.seeds, args.work, jobs=len(arms))
    for r in rows:
        r["lesions"] = lesion_scores(args.work / r["run"] / "pred_default", data / "labelsTs")
        print(
            r["arm"], r["seed"], r["train_steps"], round(r["foreground"]["dice"], 4), r["lesions"]
        )
    record = results_record(rows, {"command": " ".join(sys.argv), "budget": args.budget})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
