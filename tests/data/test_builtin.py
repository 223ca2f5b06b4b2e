import json

import nibabel as nib
import numpy as np
import pytest

from medflow.data.builtin import build, mni152_slabs
from medflow.data.layout import load_dataset, verify_dataset
from medflow.errors import MedflowError, OutputExistsError


def test_slab_layout_has_gaps_and_covers_the_range():
    slabs = mni152_slabs(189, thickness=12, gap=2, first=1, last=153)
    assert slabs[0] == (1, 13)
    for (a0, a1), (b0, _) in zip(slabs, slabs[1:]):
        assert b0 - a1 == 2 and a1 - a0 == 12
    assert slabs[-1][1] <= 154
    with pytest.raises(ValueError):
        mni152_slabs(10, thickness=0, gap=1, first=0, last=9)


@pytest.fixture(scope="module")
def mni(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin") / "mni"
    return out, build("mni152-tissue", out)


def test_mni152_split_is_leak_free(mni):
    _, meta = mni
    split = meta["medflow"]["split"]
    train = [tuple(c["slices"]) for c in split["train"]]
    test = [tuple(c["slices"]) for c in split["test"]]
    assert len(train) >= 6 and len(test) >= 3
    gap = meta["medflow"]["slab_gap"]
    for a0, a1 in train:
        for b0, b1 in test:
            # half-open ranges: at least `gap` discarded slices between any two slabs
            assert b0 - a1 >= gap or a0 - b1 >= gap
    assert meta["labels"] == {"background": 0, "grey_matter": 1, "white_matter": 2}


def test_mni152_verifies_and_keeps_the_template_geometry(mni):
    out, meta = mni
    assert verify_dataset(out) == []
    spec = load_dataset(out)
    assert len(spec.training) == meta["numTraining"] and all(c.label for c in spec.test)
    img = nib.load(str(spec.test[0].images[0]))
    lab = nib.load(str(spec.test[0].label))
    z0 = meta["medflow"]["split"]["test"][0]["slices"][0]
    assert img.shape[:2] == (197, 233) and img.shape == lab.shape
    # each slab sits where it was in the template: origin moved by z0 slices of 1 mm
    assert np.allclose(img.affine[:3, 3], [-98.0, -134.0, -72.0 + z0])
    labels = np.asarray(lab.dataobj)
    assert set(np.unique(labels).tolist()) == {0, 1, 2}


def test_build_refuses_to_overwrite_without_force(mni):
    out, _ = mni
    with pytest.raises(OutputExistsError):
        build("mni152-tissue", out)


def test_dsb_nuclei_left_right_split(tmp_path):
    out = tmp_path / "dsb"
    meta = build("dsb-nuclei", out)
    assert verify_dataset(out) == []
    split = meta["medflow"]["split"]
    assert all(c["origin"][1] + meta["medflow"]["tile"] <= 256 for c in split["train"])
    assert all(c["origin"][1] >= 256 for c in split["test"])
    spec = load_dataset(out)
    assert spec.file_ending == ".png" and spec.labels == {"background": 0, "nucleus": 1}
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == len(spec.training)


def test_unknown_dataset(tmp_path):
    with pytest.raises(MedflowError, match="unknown dataset 'brats'"):
        build("brats", tmp_path / "x")
    assert not (tmp_path / "x").exists()
