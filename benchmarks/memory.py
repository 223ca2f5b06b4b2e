"""Peak resident memory of ``medflow predict`` on a 512 x 512 x 300 CT-sized volume.

Builds a small synthetic CT-like training set (0.63 x 0.63 x 2.5 mm, Hounsfield-like
intensities, one lesion class) and trains a planned model for a few steps (the weights do not
matter for memory; the plan, its spacing, patch and depth do), writes one 512 x 512 x 300
volume, then predicts it in a fresh process while sampling that process's resident set every
5 ms. The goal of issue 13: under 4 GiB.

    python benchmarks/memory.py --work /tmp/memory --results benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE, SPACING = (512, 512, 300), (0.63, 0.63, 2.5)


def ct_volume(shape, rng) -> tuple[np.ndarray, np.ndarray]:
    """A body-like ellipse of soft tissue (40 HU) in air (-1000 HU) with a 20 mm lesion
    (80 HU), noise 20 HU: image (float32) and label (uint8)."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    img = np.where(body, 40.0, -1000.0).astype(np.float32)[..., None].repeat(shape[2], 2)
    lab = np.zeros(shape, dtype=np.uint8)
    cx, cy = rng.integers(shape[0] // 3, 2 * shape[0] // 3, 2)
    r = 10 / SPACING[0]
    disc = (np.arange(shape[0])[:, None] - cx) ** 2 + (np.arange(shape[1])[None] - cy) ** 2 < r * r
    lab[disc, shape[2] // 3 : 2 * shape[2] // 3] = 1
    img[lab == 1] = 80.0
    img += rng.normal(0, 20, shape).astype(np.float32)
    return img, lab


def write_case(path_img: Path, path_lab: Path | None, shape, rng) -> None:
    import nibabel as nib

    img, lab = ct_volume(shape, rng)
    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(img, affine), str(path_img))
    if path_lab is not None:
        nib.save(nib.Nifti1Image(lab, affine), str(path_lab))


def build(work: Path) -> Path:
    data = work / "ct"
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (data / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):  # small training cases, the CT's in-plane size
        write_case(
            data / "imagesTr" / f"ct{i}_0000.nii.gz",
            data / "labelsTr" / f"ct{i}.nii.gz",
            (512, 512, 12),
            rng,
        )
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1},
            "numTraining": 3, "file_ending": ".nii.gz"}  # fmt: skip
    (data / "dataset.json").write_text(json.dumps(meta))
    (work / "big").mkdir(parents=True, exist_ok=True)
    write_case(work / "big" / "big_0000.nii.gz", None, SHAPE, rng)
    return data


PREDICT = """
import sys, threading, time, os
from pathlib import Path
peak = [0]
def poll():
    while True:
        pages = int(Path('/proc/self/statm').read_text().split()[1])
        peak[0] = max(peak[0], pages * os.sysconf('SC_PAGE_SIZE'))
        time.sleep(0.005)
threading.Thread(target=poll, daemon=True).start()
from medflow.segmentation.predict import predict_folder
t0 = time.perf_counter()
predict_folder(sys.argv[1], sys.argv[2], sys.argv[3], force=True, quiet=True)
print(peak[0], time.perf_counter() - t0)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    from medflow.engine.checkpoint import load_checkpoint
    from medflow.segmentation.config import TrainConfig
    from medflow.segmentation.train import train

    data = build(args.work)
    cfg = TrainConfig(plan="auto", steps=args.steps, val_fraction=0, warmup_steps=1)
    result = train(data, args.work / "run", cfg, force=True, quiet=True)
    ckpt = load_checkpoint(result.final_checkpoint)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PREDICT, str(result.final_checkpoint), str(args.work / "big"),
         str(args.work / "pred")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    peak, seconds = out.stdout.split()
    record = {
        "volume": list(SHAPE),
        "spacing_mm": list(SPACING),
        "plan": {k: ckpt["plan"][k] for k in ("target_spacing", "patch_size", "levels")},
        "channels": ckpt["config"]["channels"],
        "peak_resident_gib": int(peak) / 2**30,
        "predict_seconds": float(seconds),
        "wall_seconds_with_start": time.perf_counter() - t0,
        "goal_gib": 4.0,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
