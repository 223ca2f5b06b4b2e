"""Rebuild the golden files of tests/golden/test_golden.py.

    .venv/bin/python tests/golden/regenerate.py

Builds the tiny dataset (:mod:`tiny_mni152`), trains the tiny MedFlowSeg of
:data:`GOLDEN_CONFIG` on one CPU thread, predicts the golden input with
``predict_folder``'s defaults (one Euler step, channels-last) on the CPU, and writes
``checkpoint.pt``, ``input/``, ``expected/`` and ``golden.json`` here. Run it only when a
change is meant to alter results, and say why in the commit (README.md beside this file).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # tiny_mni152 beside this file, when run as a script

from tiny_mni152 import GOLDEN_CASE, build_tiny_mni152  # noqa: E402

from medflow import __version__  # noqa: E402
from medflow.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from medflow.metrics.overlap import confusion, dice  # noqa: E402
from medflow.segmentation.config import TrainConfig  # noqa: E402
from medflow.segmentation.predict import predict_folder  # noqa: E402
from medflow.segmentation.train import train  # noqa: E402

# tiny on purpose: a checkpoint of ~0.4 MB, trained in seconds; a weak model, whose many
# uncertain boundary voxels make the stored mask sensitive to any change in results
GOLDEN_CONFIG = TrainConfig(
    size=32,
    channels=(8, 16),
    steps=60,
    batch_size=8,
    warmup_steps=6,
    val_fraction=0.0,
    checkpoint_every=60,
    threads=1,
    seed=0,
)
CHECKPOINT = HERE / "checkpoint.pt"
INPUT = HERE / "input" / f"{GOLDEN_CASE}_0000.nii.gz"
EXPECTED = HERE / "expected" / f"{GOLDEN_CASE}.nii.gz"
RECORD = HERE / "golden.json"


def regenerate(work: Path) -> dict:
    """Write the golden files, using ``work`` for the dataset and the run; returns the
    record written to ``golden.json``."""
    data = build_tiny_mni152(work / "data")
    result = train(data, work / "run", GOLDEN_CONFIG, device="cpu", quiet=True)
    ckpt = load_checkpoint(result.final_checkpoint)
    # the run's temporary dataset path means nothing to a reader of the committed file
    ckpt["dataset"] = "tests/golden/tiny_mni152.py (built by tests/golden/regenerate.py)"
    save_checkpoint(CHECKPOINT, ckpt)
    INPUT.parent.mkdir(exist_ok=True)
    shutil.copyfile(data / "imagesTs" / INPUT.name, INPUT)
    [mask] = predict_folder(CHECKPOINT, INPUT.parent, work / "pred", device="cpu", quiet=True)
    EXPECTED.parent.mkdir(exist_ok=True)
    shutil.copyfile(mask, EXPECTED)

    pred = np.asarray(nib.load(EXPECTED).dataobj)
    truth = np.asarray(nib.load(data / "labelsTs" / EXPECTED.name).dataobj)
    record = {
        "case": GOLDEN_CASE,
        "config": {k: GOLDEN_CONFIG.to_dict()[k] for k in ("size", "channels", "steps", "seed")},
        "shape": list(pred.shape),
        # how good the golden model is (not what the test checks): Dice of the stored mask
        # against the case's true labels
        "dice_vs_truth": {
            name: round(dice(*confusion(pred, truth, value)), 4)
            for name, value in ckpt["labels"].items()
            if value
        },
        "medflow_version": __version__,
        "torch_version": torch.__version__,
    }
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        record = regenerate(Path(tmp))
    print(json.dumps(record, indent=2))
    for path in (CHECKPOINT, INPUT, EXPECTED, RECORD):
        print(f"{path.relative_to(HERE.parent.parent)}: {path.stat().st_size / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
