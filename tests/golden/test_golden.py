"""Golden end-to-end test: the committed tiny checkpoint must reproduce its stored mask.

As nnU-Net's CI checks inference against a stored output: ``predict_folder`` with its
defaults (one Euler step, seed 0, channels-last) on the CPU predicts the committed input, and
every foreground class must overlap the stored mask with Dice >= ``MIN_DICE``. Not exact
equality, because float rounding differs between CPUs and can flip a voxel whose two top
classes nearly tie. Measured on the golden case (69 498 voxels, 28 802 of them foreground):

* rounding-sized changes move nothing: contiguous instead of channels-last, 2 threads,
  batch 1, or every weight multiplied by ``1 + 1e-5 * N(0, 1)`` leave 0 voxels changed;
  ``1e-4`` changes 1-2 voxels, and ``1e-3`` (some 8 000 times float32's precision) 7-15
  (Dice >= 0.9995);
* changes of results move far more: z-scored input divided by 1.01 (or shifted by 0.01):
  50-53 voxels, Dice 0.9983-0.9987; by 1.02: ~110 voxels, 0.9964-0.9972; SiLU made
  ``x * sigmoid(1.05 x)``: 96 voxels, 0.9965; noise scaled by 0.9: 310 voxels, 0.9885; two
  Euler steps instead of one: 1482 voxels, 0.9456; the output resized back with
  ``align_corners=True``: 1906 voxels, 0.9526.

``MIN_DICE = 0.999`` sits between the two; 0.99 would let a 2 % change of the
normalisation through.

The files are written by ``.venv/bin/python tests/golden/regenerate.py``; see README.md here
for when to run it.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medflow.engine.checkpoint import load_checkpoint
from medflow.metrics.overlap import confusion, dice
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.predict import Predictor, predict_folder

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "checkpoint.pt"
INPUT = HERE / "input" / "mni152_slab05_0000.nii.gz"
EXPECTED = HERE / "expected" / "mni152_slab05.nii.gz"
SHAPE = (99, 117, 6)  # mni152-tissue's slab 5 at 2 mm (tiny_mni152.py)
LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}
MIN_DICE = 0.999  # see the module docstring
# what regenerate.py trains; checked so that a checkpoint swapped or regenerated with other
# settings is noticed, not silently accepted as the reference
TRAINED = {
    "model": "medflowseg",
    "size": 32,
    "channels": [8, 16],
    "steps": 60,
    "batch_size": 8,
    "seed": 0,
    "threads": 1,
    "shortcut_fraction": 0.25,
    "shortcut_max_steps": 8,
}
NET = {"in_channels": 1, "num_classes": 3, "channels": [8, 16], "flow": True, "step_input": True}


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _listed(value):
    """Tuples as lists: configs in a checkpoint keep whichever the writer had."""
    return list(value) if isinstance(value, tuple) else value


def test_stored_checkpoint_is_the_expected_tiny_model():
    ckpt = load_checkpoint(CHECKPOINT)
    assert {k: _listed(ckpt["config"][k]) for k in TRAINED} == TRAINED
    assert {k: _listed(ckpt["net"][k]) for k in NET} == NET
    assert ckpt["labels"] == LABELS and ckpt["step"] == 60
    assert tuple(ckpt["preprocessing"]["size"]) == (32, 32)
    assert ckpt["preprocessing"]["slice_axis"] == 2
    # configs stored before a field existed must still load, the field at its default
    TrainConfig.from_dict(ckpt["config"])
    predictor = Predictor(CHECKPOINT, device="cpu")
    # written before methods were named: its config says which it is
    assert "method" not in ckpt and predictor.method.name == "medflowseg-shortcut"
    assert _read(INPUT).shape == _read(EXPECTED).shape == SHAPE
    # the reference is worth matching: both tissues are present in bulk
    counts = np.bincount(_read(EXPECTED).ravel(), minlength=3)
    assert counts.size == 3 and min(counts[1:]) > 1000, counts


def test_prediction_reproduces_the_stored_mask(tmp_path):
    [written] = predict_folder(
        CHECKPOINT, INPUT.parent, tmp_path / "pred", device="cpu", quiet=True
    )
    assert written.name == EXPECTED.name
    pred, expected = _read(written), _read(EXPECTED)
    assert pred.shape == expected.shape == SHAPE
    scores = {
        name: dice(*confusion(pred, expected, value)) for name, value in LABELS.items() if value
    }
    differing = int(np.count_nonzero(pred != expected))
    assert min(scores.values()) >= MIN_DICE, (
        f"prediction no longer reproduces tests/golden/expected (Dice {scores}, {differing} "
        "voxels differ); if the change is meant to alter results, regenerate: "
        ".venv/bin/python tests/golden/regenerate.py (tests/golden/README.md)"
    )
    assert np.allclose(nib.load(written).affine, nib.load(EXPECTED).affine)
