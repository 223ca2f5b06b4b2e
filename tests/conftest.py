"""Shared test set-up: one intra-op thread (faster for small convolutions on 2-vCPU machines),
fixed seeds, and small helpers for writing tiny datasets."""

from __future__ import annotations

import importlib.util
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

# the smallest training run that exercises every part of the loop
TINY_TRAIN = dict(
    size=16,
    channels=(8, 16),
    batch_size=4,
    threads=1,
    val_every=2,
    checkpoint_every=2,
    warmup_steps=2,
)

# stage 1 of AlignFlow (SynthConfig) at the smallest size its tests learn something at
TINY_SYNTH = dict(
    size=16,
    mask_channels=(8, 16),
    image_channels=(8, 16),
    batch_size=8,
    sample_steps=3,
    threads=1,
    warmup_steps=5,
)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(script: str, name: str) -> Iterator:
    """Import ``benchmarks/<script>`` as module ``name`` for a test module's fixture to
    yield (registered in ``sys.modules`` while in use: dataclasses look their module up
    there), and remove it afterwards."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def train_flags(**fields) -> list[str]:
    """`medflow train` flags of a tiny run (16 x 16, channels 8,16, batch 4, one thread,
    quiet), with ``fields`` (TrainConfig names) added or replacing those."""
    base = {"size": 16, "channels": "8,16", "batch_size": 4, "threads": 1, **fields}
    return [a for k, v in base.items() for a in (f"--{k.replace('_', '-')}", str(v))] + ["--quiet"]


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def make_nnunet_dataset(
    root,
    n_train=4,
    n_test=2,
    shape=(24, 20, 5),
    ending=".nii.gz",
    spacing=(1.0, 1.2, 2.5),
    seed=0,
    channels=1,
):
    """Write a tiny learnable nnU-Net raw v2 dataset: two discs (labels 1 and 2) whose
    intensities differ from the background, with noise. Returns the root."""
    import json
    from pathlib import Path

    import nibabel as nib
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    xx, yy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for i in range(n_train + n_test):
        lab = np.zeros(shape, dtype=np.uint8)
        for value in (1, 2):
            cx, cy = rng.uniform(5, shape[0] - 5), rng.uniform(5, shape[1] - 5)
            r = rng.uniform(2.5, 4.5)
            lab[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = value
        img = (lab * 40.0 + 20.0 + rng.normal(0, 4, shape)).astype(np.float32)
        split = "Tr" if i < n_train else "Ts"
        case = f"case{i:02d}"
        if ending == ".png":
            Image.fromarray(np.clip(img[:, :, 0], 0, 255).astype(np.uint8)).save(
                root / f"images{split}" / f"{case}_0000.png"
            )
            Image.fromarray(lab[:, :, 0]).save(root / f"labels{split}" / f"{case}.png")
        else:
            affine = np.diag([*spacing, 1.0])
            affine[:3, 3] = [-10.0, 5.0, 2.0 * i]
            for c in range(channels):
                # later channels: the same anatomy at another contrast
                chan = img if c == 0 else (200.0 - img).astype(np.float32)
                path = root / f"images{split}" / f"{case}_{c:04d}{ending}"
                nib.save(nib.Nifti1Image(chan, affine), str(path))
            nib.save(nib.Nifti1Image(lab, affine), str(root / f"labels{split}" / f"{case}{ending}"))
    meta = {
        "channel_names": {str(c): f"MR{c}" for c in range(channels)},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": n_train,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def skull_strip(root: Path) -> Path:
    """A tiny dataset's images with exact zeros outside an ellipse (a skull-stripped head)."""
    import nibabel as nib

    for path in sorted(root.glob("images*/*.nii.gz")):
        img = nib.load(path)
        data = img.get_fdata().astype(np.float32)
        xx, yy = np.meshgrid(np.arange(data.shape[0]), np.arange(data.shape[1]), indexing="ij")
        head = ((xx - 11.5) / 10.0) ** 2 + ((yy - 9.5) / 8.0) ** 2 < 1.0
        data[~head] = 0.0
        nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return root


@pytest.fixture
def tiny_dataset(tmp_path):
    return make_nnunet_dataset(tmp_path / "ds")
