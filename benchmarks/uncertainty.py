"""Does the ensemble's uncertainty mean something? Calibration, error ranking, per-case
agreement and cost for 1, 5 and 10 noise samples; JSON plus a Markdown table.

    python benchmarks/uncertainty.py --data data/mni152 --run runs/unc_mni152 \\
        --out runs/unc_mni152/bench --results benchmarks/results/uncertainty_mni152.json
    python benchmarks/uncertainty.py --data data/dsb --run runs/unc_dsb --train-steps 150 \\
        --out runs/unc_dsb/bench --results benchmarks/results/uncertainty_dsb.json

A default MedFlowSeg is trained by the one runner into ``--run/runs/medflowseg_seed0``, or
read back when that run finished with the same configuration. For each sample count
``S`` the test images are predicted with ``S`` separate noise draws (sample ``s`` from seed
``s``, one Euler step each, fused by the mean soft mask) and written with their variance and
entropy maps into ``--out/samples_S``, which is then evaluated. Measured:

* ``mean_confidence`` against ``1 - error_rate``: over- or under-confidence overall;
* ``ece``: top-label expected calibration error (15 bins) of the fused probability of the
  predicted class, pooled over every voxel inside the crop boxes the network predicted;
* ``auroc_entropy``, ``auroc_variance``: how well each map ranks the wrongly labelled voxels
  among those voxels (0.5 = chance);
* ``spearman_case``: Spearman correlation of per-case uncertainty (summed entropy per
  predicted foreground voxel) with per-case foreground Dice; negative is good;
* ``spearman_slice``: the same over 2D slices along the slice axis that hold reference
  foreground (more points than cases);
* ``dice``: foreground-mean Dice of ``medflow evaluate`` at native resolution;
* ``seconds``: wall time of prediction with maps (separate draws); ``seconds_averaged``: the
  same number of draws averaged inside one ``Predictor.probs`` call, without maps;
  ``cpu_seconds``, ``cpu_seconds_averaged``: the process's CPU time for the same, which other
  jobs on a shared machine disturb less than wall time (run with ``--threads 1`` to compare).

``--report`` writes ``medflow report`` for the ``--report-samples`` folder, and
``--screenshot`` a headless-Chromium screenshot of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def slice_scores(
    labels: np.ndarray, ref: np.ndarray, entropy: np.ndarray, axis: int, classes: list[int]
) -> list[tuple[float, float]]:
    """(uncertainty, foreground-mean Dice) of every slice along ``axis`` with reference
    foreground."""
    from medflow.metrics.overlap import confusion, dice
    from medflow.uncertainty.maps import case_uncertainty

    out = []
    for i in range(ref.shape[axis]):
        r, p = np.take(ref, i, axis), np.take(labels, i, axis)
        if not r.any():
            continue
        d = float(np.mean([dice(*confusion(p, r, c)) for c in classes]))
        out.append((case_uncertainty(np.take(entropy, i, axis), p), d))
    return out


def measure(args: argparse.Namespace, ckpt: Path, samples: int) -> dict:
    from medflow.data.io import read_image, read_label, write_volume
    from medflow.data.layout import find_cases
    from medflow.data.naming import MAPS
    from medflow.metrics.summary import evaluate_folders
    from medflow.segmentation.predict import (
        Predictor,
        SamplingOptions,
        map_paths,
        output_path,
        write_map,
    )
    from medflow.uncertainty.calibration import error_auroc, reliability, spearman
    from medflow.uncertainty.maps import case_uncertainty

    predictor = Predictor(ckpt, "cpu")
    k = predictor.net_cfg.num_classes
    cases = find_cases(args.data / "imagesTs", None, len(predictor.channel_names))
    folder = args.out / f"samples_{samples}"
    folder.mkdir(parents=True, exist_ok=True)
    options = SamplingOptions(samples=samples, seed=args.seed)
    conf, correct, ent, var, per_case, per_slice = [], [], [], [], {}, []
    seconds = seconds_averaged = cpu = cpu_averaged = 0.0
    for case in cases:
        volume = read_image(case.images)
        t0, c0 = time.perf_counter(), time.process_time()
        pred = predictor.predict_uncertain(volume, options)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        predictor.predict_volume(volume, options)
        seconds_averaged += time.perf_counter() - t0
        cpu_averaged += time.process_time() - c0
        write_volume(output_path(case, folder), pred.labels, volume.geometry)
        for path, kind in zip(map_paths(case, folder), MAPS):
            write_map(path, getattr(pred, kind), volume.geometry, kind, k)
        ref = read_label(args.data / "labelsTs" / output_path(case, folder).name).array
        box = pred.box
        conf.append(pred.confidence[box].ravel())
        correct.append((pred.labels[box] == ref[box]).ravel())
        ent.append(pred.entropy[box].ravel())
        var.append(pred.variance[box].ravel())
        per_case[case.case_id] = case_uncertainty(pred.entropy, pred.labels)
        per_slice += slice_scores(
            pred.labels, ref, pred.entropy, predictor.prep.slice_axis, list(range(1, k))
        )
    summary = evaluate_folders(folder, args.data / "labelsTs", folder / "eval", force=True)
    dice = {
        row["case"]: float(np.mean([m["dice"] for m in row["metrics"].values()]))
        for row in summary["per_case"]
    }
    conf, correct = np.concatenate(conf), np.concatenate(correct)
    error = ~correct
    ids = sorted(per_case)
    slice_unc, slice_dice = zip(*per_slice)
    bins = reliability(conf, correct, n_bins=15)
    return {
        "samples": samples,
        "voxels": int(conf.size),
        "error_rate": float(error.mean()),
        "mean_confidence": float(conf.mean()),
        "ece": bins.ece,
        "reliability": {
            "count": bins.count.tolist(),
            "confidence": [None if np.isnan(v) else float(v) for v in bins.confidence],
            "accuracy": [None if np.isnan(v) else float(v) for v in bins.accuracy],
        },
        "auroc_entropy": error_auroc(np.concatenate(ent), error),
        "auroc_variance": error_auroc(np.concatenate(var), error),
        "spearman_case": spearman([per_case[i] for i in ids], [dice[i] for i in ids]),
        "n_cases": len(ids),
        "spearman_slice": spearman(slice_unc, slice_dice),
        "n_slices": len(per_slice),
        "dice": summary["foreground_mean"]["dice"],
        "dice_per_class": {c: m["dice"] for c, m in summary["mean"].items()},
        "case_uncertainty": per_case,
        "case_dice": dice,
        "seconds": round(seconds, 2),
        "seconds_averaged": round(seconds_averaged, 2),
        "cpu_seconds": round(cpu, 2),
        "cpu_seconds_averaged": round(cpu_averaged, 2),
    }


def screenshot(html: Path, png: Path) -> None:
    from medflow.report.browser import headless_chromium

    with headless_chromium(1200, 1500) as driver:
        driver.get(html.resolve().as_uri())
        driver.save_screenshot(str(png))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset with imagesTs/labelsTs")
    parser.add_argument("--run", type=Path, required=True, help="run folder (trained if empty)")
    parser.add_argument("--out", type=Path, required=True, help="folder for predictions")
    parser.add_argument("--results", type=Path, required=True, help="JSON to write")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--report", type=Path, help="write medflow report here")
    parser.add_argument("--report-samples", type=int, default=5)
    parser.add_argument("--screenshot", type=Path, help="PNG of the report in Chromium")
    args = parser.parse_args()

    from medflow.engine.runtime import configure_threads
    from medflow.segmentation.protocol import Arm, run_arm

    threads = configure_threads(args.threads)
    fields = {
        "threads": threads,
        **({} if args.train_steps is None else {"steps": args.train_steps}),
    }
    # the one runner trains, or reads back a finished run of the same configuration
    (trained,) = run_arm(Arm("medflowseg", args.data, fields, settings=()), 0, args.run, reuse=True)
    ckpt = args.run / trained["checkpoint"]
    rows = [measure(args, ckpt, s) for s in args.samples]
    record = {
        "data": str(args.data),
        "run": str(ckpt.parent),
        "train_seconds": round(trained["train_seconds"], 1),
        "config": json.loads((ckpt.parent / "config.json").read_text())["config"],
        "threads": threads,
        "seed": args.seed,
        "rows": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")

    print(
        "| samples | Dice | ECE | AUROC entropy | AUROC variance | Spearman case (n) "
        "| Spearman slice (n) | CPU s (maps) | CPU s (averaged) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['samples']} | {r['dice']:.4f} | {r['ece']:.4f} | {r['auroc_entropy']:.4f} "
            f"| {r['auroc_variance']:.4f} | {r['spearman_case']:.2f} ({r['n_cases']}) "
            f"| {r['spearman_slice']:.2f} ({r['n_slices']}) | {r['cpu_seconds']:.1f} "
            f"| {r['cpu_seconds_averaged']:.1f} |"
        )
    if args.report is not None:
        from medflow.report.html import write_report

        folder = args.out / f"samples_{args.report_samples}"
        write_report(folder, folder / "eval", args.report, run=ckpt.parent, force=True)
        print(f"report: {args.report}")
        if args.screenshot is not None:
            screenshot(args.report, args.screenshot)
            print(f"screenshot: {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
