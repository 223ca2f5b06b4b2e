"""Reference images are prepared exactly as the segmenter prepares a target scan."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_nnunet_dataset

from medflow.data.builtin import REFERENCE_SLICES, build
from medflow.data.datasets import load_slices, plan_preprocessing
from medflow.data.io import read_image
from medflow.data.layout import load_dataset
from medflow.data.transforms import nonzero_box
from medflow.errors import DataError
from medflow.synthesis.align import read_references


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    out = tmp_path_factory.mktemp("shifted") / "mni-shifted"
    return out, build("mni152-tissue-shifted", out)


def test_each_reference_equals_its_slice_of_the_target_scan(shifted):
    out, meta = shifted
    spec = load_dataset(out)
    # the segmenter's own plan and data path (medflow train's load_slices)
    prep = plan_preprocessing(spec, spec.training, (32, 32))
    refs = read_references(out / "references", prep, k=None)
    cases = {c.case_id: c for c in spec.training}
    z0 = {c["case"]: c["slices"][0] for c in meta["medflow"]["split"]["train"]}
    records = meta["medflow"]["references"]
    assert refs.images.shape == (len(records), 1, 32, 32) and len(refs.files) == len(records)
    areas = []
    for i, ref in enumerate(records):
        case = cases[ref["case"]]
        scan = load_slices([case], prep, spec.num_classes)
        box = nonzero_box(read_image(case.images).array)
        index = ref["slice"] - z0[ref["case"]] - box[prep.slice_axis].start
        assert torch.equal(refs.images[i], scan.images[index]), ref
        # the foreground is the tissue of that slice as the segmenter sees it: where the
        # labels say head or brain, it is foreground
        brain = scan.masks[index] > 0
        assert refs.foreground[i, 0][brain].float().mean() > 0.95
        areas.append(refs.foreground[i].float().mean().item())
    # peripheral slices keep their small heads (a lone slice was blown up to the frame)
    assert min(areas) < 0.5 * max(areas)


def test_the_first_k_references_are_the_first_k_files(shifted):
    out, _ = shifted
    spec = load_dataset(out)
    prep = plan_preprocessing(spec, spec.training, (32, 32))
    every = read_references(out / "references", prep, k=None)
    first = read_references(out / "references", prep, k=3)
    assert torch.equal(first.images, every.images[:3]) and first.files == every.files[:3]


def test_a_reference_seed_draws_k_files_at_random_nested_over_k(shifted):
    out, _ = shifted
    spec = load_dataset(out)
    prep = plan_preprocessing(spec, spec.training, (32, 32))
    every = read_references(out / "references", prep, k=None)
    by_file = dict(zip(every.files, every.images, strict=True))
    draws = {s: read_references(out / "references", prep, k=3, order_seed=s) for s in range(4)}
    for seed, drawn in draws.items():
        # the same file, prepared the same way, whatever the draw
        assert all(torch.equal(by_file[f], x) for f, x in zip(drawn.files, drawn.images))
        again = read_references(out / "references", prep, k=3, order_seed=seed)
        assert again.files == drawn.files  # one seed, one draw
        one = read_references(out / "references", prep, k=1, order_seed=seed)
        assert one.files == drawn.files[:1]  # K = 1 among K = 3
    assert len({tuple(d.files) for d in draws.values()}) > 1
    assert any(d.files != every.files[:3] for d in draws.values())


def _folder_with_slices(tmp_path, record):
    src = make_nnunet_dataset(tmp_path / "ds", n_train=2, n_test=1)
    refs = tmp_path / "refs"
    refs.mkdir()
    path = sorted((src / "imagesTs").glob("*.nii.gz"))[0]
    (refs / path.name).write_bytes(path.read_bytes())
    (refs / REFERENCE_SLICES).write_text(json.dumps(record(path.name)))
    spec = load_dataset(src)
    return refs, plan_preprocessing(spec, spec.training, (16, 16))


def test_a_volume_without_a_slice_list_gives_all_its_slices(tmp_path):
    refs, prep = _folder_with_slices(tmp_path, lambda name: {"slice_axis": 2, "slices": {}})
    got = read_references(refs, prep, k=None)
    volume = read_image(sorted(refs.glob("*.nii.gz")))
    assert got.images.shape[0] == volume.array.shape[3] and got.foreground.all()


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (lambda name: {"slice_axis": 0, "slices": {name: [1]}}, "slices along axis 0"),
        (lambda name: {"slice_axis": 2, "slices": {"other.nii.gz": [1]}}, "names files not"),
        (lambda name: {"slice_axis": 2, "slices": {name: [99]}}, r"slices \[99\]"),
        (lambda name: {"slices": {name: [1]}}, "is not a slice list"),
    ],
)
def test_bad_slice_lists_are_refused(tmp_path, record, message):
    refs, prep = _folder_with_slices(tmp_path, record)
    with pytest.raises(DataError, match=message):
        read_references(refs, prep, k=None)


def test_the_listed_slice_is_prepared_with_its_volume(tmp_path):
    refs, prep = _folder_with_slices(
        tmp_path, lambda name: {"slice_axis": 2, "slices": {name: [3]}}
    )
    got = read_references(refs, prep, k=None)
    path = sorted(refs.glob("*.nii.gz"))[0]
    # the volume's slices as the segmenter prepares them (no slice list: every slice)
    whole = tmp_path / "whole"
    whole.mkdir()
    shutil.copy(path, whole / path.name)
    assert torch.equal(got.images[0], read_references(whole, prep, k=None).images[3])
    # the same slice stored on its own is normalised over itself: another image
    alone = tmp_path / "alone"
    alone.mkdir()
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 3:4], img.affine), alone / path.name)
    single = read_references(alone, prep, k=None)
    assert not torch.allclose(single.images[0], got.images[0], atol=1e-2)
