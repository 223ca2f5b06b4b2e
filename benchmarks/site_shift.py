"""How far each simulated site moves mni152-tissue's test slabs, and what it costs a segmenter.

For the source and every site of ``medflow.data.shift.SITES`` (and each component of either
site alone) it prints, after the pipeline's per-image z-score over the head, the mean
intensity of fluid / grey / white matter on the three test slabs, the white-minus-grey gap,
and the mean grey/white Dice of a classifier of voxel intensity alone (no context) fitted
on the source's training slabs: a crude, training-free proxy for what a shift costs a
source-trained segmenter. About ten seconds on one core:

    python benchmarks/site_shift.py [--results benchmarks/results/site_shift.json]

With ``--segmenter NAME=CKPT ...`` (``medflow train`` checkpoints, e.g. the AlignFlow
harness's ``runs/source_seed0/checkpoint_final.pt``) every arm's test slabs are also written
as a dataset, predicted by each checkpoint at native resolution (``predict_folder``, default
sampling) and scored (``evaluate_folders``): the mean grey/white Dice and IoU per checkpoint,
and, for names ``LABEL_seedN``, the mean and spread over seeds per ``LABEL``. That is the
check the proxy stands in for: which component of a site costs a trained segmenter, and
which of them a segmenter trained some other way (augmentation, aligned pairs) recovers.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medflow.data import builtin
from medflow.data.shift import SITES, AcquisitionShift, apply_shift

BINS = np.linspace(-5.0, 4.0, 181)  # z-scored intensity bins of the classifier
NONE = AcquisitionShift(gamma=1.0, bias_strength=0.0, noise_std=0.0, downsample=1)


@dataclass(frozen=True)
class Arm:
    name: str
    shift: AcquisitionShift | None  # None: the source images


def arms() -> list[Arm]:
    out = [Arm("source", None), *(Arm(name, shift) for name, shift in SITES.items())]
    b = SITES["site-b"]
    for field in ("gamma", "bias_strength", "noise_std", "downsample"):
        out.append(Arm(f"site-b {field} only", replace(NONE, **{field: getattr(b, field)})))
    c = SITES["site-c"]
    for field in ("remap_peak", "kspace_fraction", "ghost_phase", "rician_std"):
        out.append(Arm(f"site-c {field} only", replace(NONE, **{field: getattr(c, field)})))
    return out


def shifted(arm: Arm, slab) -> np.ndarray:
    """The slab's image through the arm's shift, seeded by slab index as the builtins are."""
    if arm.shift is None:
        return slab.image
    return apply_shift(slab.image, arm.shift, np.random.default_rng(slab.index))


def zscore(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image z-scored over its nonzero voxels, as medflow's preprocessing does, and that
    head mask."""
    x = image.astype(np.float64)
    head = x != 0
    return np.where(head, (x - x[head].mean()) / x[head].std(), 0.0), head


def fit_classifier(slabs: list) -> np.ndarray:
    """Per z-score bin, the most frequent label over the source's training slabs."""
    counts = np.zeros((3, len(BINS) - 1))
    for slab in slabs:
        z, head = zscore(slab.image)
        for k in range(3):
            counts[k] += np.histogram(z[head & (slab.labels == k)], BINS)[0]
    return np.argmax(counts, axis=0)


def measure(arm: Arm, test: list, lut: np.ndarray) -> dict:
    means, dice = [], []
    for slab in test:
        z, head = zscore(shifted(arm, slab))
        means.append([z[head & (slab.labels == k)].mean() for k in range(3)])
        bins = np.clip(np.digitize(z, BINS) - 1, 0, len(BINS) - 2)
        pred = np.where(head, lut[bins], 0)
        dice.append(
            [
                2
                * ((pred == k) & (slab.labels == k)).sum()
                / ((pred == k).sum() + (slab.labels == k).sum())
                for k in (1, 2)
            ]
        )
    fluid, grey, white = np.mean(means, axis=0)
    return {
        "arm": arm.name,
        "z_fluid": round(float(fluid), 2),
        "z_grey": round(float(grey), 2),
        "z_white": round(float(white), 2),
        "gap": round(float(white - grey), 2),
        "dice_intensity_only": round(float(np.mean(dice)), 3),
    }


def segmenter_scores(arm: Arm, test: list, checkpoints: dict[str, Path], tmp: Path) -> dict:
    """Each checkpoint's mean grey/white Dice and IoU on the arm's test slabs, predicted at
    native resolution with the default sampling, and per ``LABEL`` of ``LABEL_seedN`` names
    the mean and sample std over its seeds."""
    from medflow.metrics.summary import evaluate_folders
    from medflow.segmentation.predict import predict_folder

    data = tmp / re.sub(r"[^A-Za-z0-9]+", "_", arm.name)
    builtin._write_slabs(data, test, [shifted(arm, s) for s in test])
    scores = {}
    for name, ckpt in checkpoints.items():
        pred, ev = data / f"pred_{name}", data / f"eval_{name}"
        predict_folder(ckpt, data / "imagesTs", pred, device="cpu", quiet=True)
        fg = evaluate_folders(pred, data / "labelsTs", ev)["foreground_mean"]
        scores[name] = {"dice": round(fg["dice"], 4), "iou": round(fg["iou"], 4)}
    groups: dict[str, list[float]] = {}
    for name, score in scores.items():
        groups.setdefault(re.sub(r"_seed\d+$", "", name), []).append(score["dice"])
    summary = {
        label: {
            "dice_mean": round(float(np.mean(d)), 4),
            "dice_std": round(_std(d), 4),
            "n": len(d),
        }
        for label, d in groups.items()
    }
    return {"segmenters": scores, "segmenter_summary": summary}


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def parse_checkpoints(ap: argparse.ArgumentParser, items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            ap.error(f"--segmenter {item}: expected NAME=CKPT with an existing CKPT")
        out[name] = Path(path)
    return out


def print_row(r: dict) -> None:
    line = (
        f"{r['arm']:28s} fluid/grey/white {r['z_fluid']:+.2f} {r['z_grey']:+.2f} "
        f"{r['z_white']:+.2f}  gap {r['gap']:.2f}  dice {r['dice_intensity_only']:.3f}"
    )
    for label, s in r.get("segmenter_summary", {}).items():
        line += f"  {label} {s['dice_mean']:.3f}±{s['dice_std']:.3f}"
    print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, help="write the rows here as JSON")
    ap.add_argument(
        "--segmenter",
        nargs="*",
        default=[],
        metavar="NAME=CKPT",
        help="also score these checkpoints on every arm (NAME: LABEL_seedN to group seeds)",
    )
    args = ap.parse_args()
    checkpoints = parse_checkpoints(ap, args.segmenter)
    slabs = builtin._mni152_cut(12, 2, 3, 2)
    lut = fit_classifier([s for s in slabs if s.split == "train"])
    test = [s for s in slabs if s.split == "test"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in arms():
            row = measure(arm, test, lut)
            if checkpoints:
                row.update(segmenter_scores(arm, test, checkpoints, Path(tmp)))
            print_row(row)
            rows.append(row)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
