"""How far each simulated site moves mni152-tissue's test slabs, before any training.

For the source and every site of ``medflow.data.shift.SITES`` (and each of site-c's
components alone) it prints, after the pipeline's per-image z-score over the head, the mean
intensity of fluid / grey / white matter on the three test slabs, the white-minus-grey gap,
and the mean grey/white Dice of a classifier of voxel intensity alone (no context) fitted
on the source's training slabs: a crude, training-free proxy for what a shift costs a
source-trained segmenter. About ten seconds on one core:

    python benchmarks/site_shift.py [--results benchmarks/results/site_shift.json]
"""

from __future__ import annotations

import argparse
import json
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
    c = SITES["site-c"]
    for field in ("remap_peak", "kspace_fraction", "ghost_phase", "rician_std"):
        out.append(Arm(f"site-c {field} only", replace(NONE, **{field: getattr(c, field)})))
    return out


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
        image = slab.image
        if arm.shift is not None:
            image = apply_shift(image, arm.shift, np.random.default_rng(slab.index))
        z, head = zscore(image)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, help="write the rows here as JSON")
    args = ap.parse_args()
    slabs = builtin._mni152_cut(12, 2, 3, 2)
    lut = fit_classifier([s for s in slabs if s.split == "train"])
    test = [s for s in slabs if s.split == "test"]
    rows = [measure(arm, test, lut) for arm in arms()]
    for r in rows:
        print(
            f"{r['arm']:28s} fluid/grey/white {r['z_fluid']:+.2f} {r['z_grey']:+.2f} "
            f"{r['z_white']:+.2f}  gap {r['gap']:.2f}  dice {r['dice_intensity_only']:.3f}"
        )
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
