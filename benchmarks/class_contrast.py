"""Does a dataset's image still show its masks? Mean intensity per class, as the segmenter
reads each case (z-scored over its nonzero voxels), for real and synthetic training sets.

    python benchmarks/class_contrast.py NAME=DATASET [NAME=DATASET ...] \
        [--results benchmarks/results/class_contrast.json]

For every dataset (an nnU-Net raw folder with single-channel NIfTI ``imagesTr``/``labelsTr``,
e.g. the AlignFlow harness's ``datasets/aligned_k5_seed0``), over its synthetic training
cases (``synth_*``, the pairs ``synth sample`` wrote) when it has any, else over all, each
case's image is z-scored over its nonzero voxels, as ``medflow train`` normalises it,
and the mean over each label's voxels inside that head is taken; the table gives the mean
over cases of every class and the gap between the two brightest label classes (for the
brain: white minus grey matter). A synthetic set whose gap is far below the real target's
has images that no longer show the boundary its masks draw (docs/ALIGNFLOW.md).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

import nibabel as nib
import numpy as np

SYNTHETIC = "synth_*"  # the case names synth sample writes


def case_means(image: Path, label: Path, n_classes: int) -> list[float]:
    x = np.asarray(nib.load(image).dataobj, dtype=np.float64)
    y = np.asarray(nib.load(label).dataobj)
    head = x != 0
    z = (x - x[head].mean()) / x[head].std()
    return [
        float(z[head & (y == c)].mean()) if (head & (y == c)).any() else np.nan
        for c in range(n_classes)
    ]


def dataset_means(folder: Path, pattern: str) -> dict:
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    n_classes = max(labels.values()) + 1
    rows = []
    for image in sorted((folder / "imagesTr").glob("*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        if fnmatch.fnmatch(case, pattern):
            rows.append(case_means(image, folder / "labelsTr" / f"{case}.nii.gz", n_classes))
    if not rows:
        raise SystemExit(f"{folder}: no training case matches {pattern!r}")
    means = np.nanmean(np.array(rows), axis=0)
    names = sorted(labels, key=labels.get)
    top = np.argsort(means[1:])[-2:] + 1  # the two brightest label classes
    return {
        "cases": len(rows),
        "class_means": {n: round(float(m), 3) for n, m in zip(names, means, strict=True)},
        "gap": f"{names[top[1]]} - {names[top[0]]}",
        "gap_value": round(float(means[top[1]] - means[top[0]]), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+", metavar="NAME=DATASET")
    ap.add_argument("--results", type=Path, help="write the table here as JSON (and .md)")
    args = ap.parse_args()
    record = {}
    for item in args.datasets:
        name, sep, folder = item.partition("=")
        if not sep or not (Path(folder) / "dataset.json").is_file():
            ap.error(f"{item}: expected NAME=DATASET with a dataset.json in DATASET")
        synthetic = any(Path(folder).glob(f"imagesTr/{SYNTHETIC}_0000.nii.gz"))
        pattern = SYNTHETIC if synthetic else "*"
        record[name] = {
            "folder": folder,
            "cases_used": pattern,
            **dataset_means(Path(folder), pattern),
        }
    lines = ["| set | cases | class means (z) | gap |", "|---|---|---|---|"]
    for name, r in record.items():
        means = ", ".join(f"{k} {v:+.2f}" for k, v in r["class_means"].items())
        lines.append(f"| {name} | {r['cases']} | {means} | {r['gap_value']:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(record, indent=2) + "\n")
        args.results.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
