"""The tiny dataset of the golden and accuracy-regression tests, derived deterministically
from the embedded ``mni152-tissue`` (real MRI, no download).

Every slab of ``mni152-tissue`` becomes one case of six axial slices: every second voxel in
plane and every second slice (2 mm isotropic, 99 x 117 x 6). Images are stored as uint8:
the template's intensities are exact multiples of 1/255, and z-score normalisation does not
see the scale, so nothing is lost. The split is ``mni152-tissue``'s (8 training slabs, 3
test slabs), which keeps the test slabs apart from the training ones by a gap of slices.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from medflow.data.builtin import build

STRIDE = 2  # voxels kept in every spatial direction
# the golden test's input: the middle test slab
GOLDEN_CASE = "mni152_slab05"


def _subsample_affine(affine: np.ndarray) -> np.ndarray:
    """``affine`` of a volume whose every ``STRIDE``-th voxel is kept, starting at slice 1 in
    z (so that the kept slices sit in the middle of the slab's pairs)."""
    keep = np.diag([STRIDE, STRIDE, STRIDE, 1]).astype(np.float64)
    keep[2, 3] = 1.0
    return affine @ keep


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    nib.save(img, str(path))


def build_tiny_mni152(out: str | Path) -> Path:
    """Write the tiny dataset as an nnU-Net raw v2 folder at ``out``; returns ``out``."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "mni152"
        meta = build("mni152-tissue", full)
        for split in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (out / split).mkdir(parents=True, exist_ok=True)
        for suffix in ("Tr", "Ts"):
            for label_path in sorted((full / f"labels{suffix}").glob("*.nii.gz")):
                case = label_path.name.removesuffix(".nii.gz")
                image = nib.load(full / f"images{suffix}" / f"{case}_0000.nii.gz")
                labels = nib.load(label_path)
                keep = (slice(None, None, STRIDE), slice(None, None, STRIDE), slice(1, None, 2))
                voxels = image.get_fdata(dtype=np.float32)[keep]
                affine = _subsample_affine(image.affine)
                _save(
                    out / f"images{suffix}" / f"{case}_0000.nii.gz",
                    np.rint(voxels * 255.0).astype(np.uint8),
                    affine,
                )
                _save(
                    out / f"labels{suffix}" / f"{case}.nii.gz",
                    np.asarray(labels.dataobj, dtype=np.uint8)[keep],
                    affine,
                )
    tiny = {
        "channel_names": meta["channel_names"],
        "labels": meta["labels"],
        "numTraining": meta["numTraining"],
        "file_ending": ".nii.gz",
        "description": "mni152-tissue at 2 mm, six slices per slab (tests/golden/tiny_mni152.py)",
    }
    (out / "dataset.json").write_text(json.dumps(tiny, indent=2) + "\n")
    return out
