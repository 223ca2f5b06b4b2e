import json

import nibabel as nib
import numpy as np
import pytest

from medflow.data.builtin import INTENSITY_SCALE, build
from medflow.data.fingerprint import connected_objects
from medflow.data.layout import load_dataset, verify_dataset
from medflow.data.lesions import LesionConfig, brain_depth, simulate_case
from medflow.errors import MedflowError

SPACING = (1.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def phantom():
    """A 64 x 64 x 40 "head": a ball of radius 28 voxels, brighter core of radius 18."""
    g = np.indices((64, 64, 40), dtype=np.float64)
    r = np.sqrt((g[0] - 32) ** 2 + (g[1] - 32) ** 2 + (g[2] - 20) ** 2)
    image = np.where(r < 28, 0.6 + 0.3 * (r < 18), 0.0).astype(np.float32)
    return image, brain_depth(image > 0, SPACING)


@pytest.fixture(scope="module")
def cases(phantom):
    image, depth = phantom
    flat = LesionConfig(gain_range=(1.0, 1.0), bias_range=(0.0, 0.0))
    return [
        simulate_case(image, SPACING, np.random.default_rng(seed), flat, depth)
        for seed in range(12)
    ]


def _lesion_mask(case, lesion):
    components, _ = connected_objects(case.label > 0)
    centre = tuple(int(round(c)) for c in lesion.centre)
    assert components[centre] > 0, "a lesion's centre is always inside it"
    return components == components[centre]


def test_lesions_have_the_stated_sizes_and_are_separate_objects(cases):
    lesions = [lesion for case in cases for lesion in case.lesions]
    assert len(lesions) >= 20
    for case in cases:
        _, n = connected_objects(case.label > 0)
        assert n == len(case.lesions)  # 2 mm apart and star-shaped: one object each
        assert int(case.label.sum()) == sum(lesion.voxels for lesion in case.lesions)
    assert all(3.0 <= lesion.diameter_mm <= 30.0 for lesion in lesions)
    diameters = [lesion.diameter_mm for lesion in lesions]
    assert min(diameters) < 6 and max(diameters) > 15  # log-uniform over the range
    for lesion in lesions:
        if not lesion.cortical:  # whole: the equivalent diameter is the nominal one
            measured = (6 * lesion.voxels / np.pi) ** (1 / 3)
            assert measured == pytest.approx(lesion.diameter_mm, rel=0.3)
    assert {lesion.shape for lesion in lesions} == {"ellipsoid", "blob"}


def test_contrast_is_hypo_or_hyper_and_blended(phantom, cases):
    image, _ = phantom
    signs = set()
    for case in cases:
        outside = case.label == 0
        for lesion in case.lesions:
            mask = _lesion_mask(case, lesion)
            c = lesion.contrast
            assert 0.15 <= abs(c) <= 0.6
            signs.add(np.sign(c))
            ratio = case.image[mask] / image[mask]
            # occupancy >= 0.5 inside the label: between half and the full contrast
            lo, hi = sorted((1 + c / 2, 1 + c))
            assert np.all(ratio >= lo - 1e-5) and np.all(ratio <= hi + 1e-5)
            assert np.isclose(ratio.max() if c > 0 else ratio.min(), 1 + c, atol=1e-5)
        # partial volume: some unlabelled voxels next to lesions changed a little
        changed = ~np.isclose(case.image, image) & outside
        if case.lesions:
            assert changed.any()
    assert signs == {-1.0, 1.0}


def test_cortical_lesions_reach_the_surface_and_deep_ones_do_not(phantom, cases):
    image, depth = phantom
    kinds = set()
    for case in cases:
        assert np.all(case.image[image == 0] == 0)  # nothing outside the brain
        assert not case.label[image == 0].any()
        for lesion in case.lesions:
            touches = depth[_lesion_mask(case, lesion)].min() <= 1.0
            assert touches == lesion.cortical
            kinds.add(lesion.cortical)
    assert kinds == {True, False}


def test_some_cases_have_no_lesion_and_cases_differ(phantom, cases):
    image, depth = phantom
    counts = [len(case.lesions) for case in cases]
    assert 0 in counts and max(counts) > 1
    none = simulate_case(image, SPACING, np.random.default_rng(0), LesionConfig(empty_fraction=1))
    assert not none.label.any()
    ratio = none.image[image > 0] / image[image > 0]
    # a gain and a smooth bias: the intensity changes, by at most +-(10 % x e^0.15)
    assert ratio.std() > 1e-3 and 0.9 * np.exp(-0.15) - 1e-6 <= ratio.min()
    assert ratio.max() <= 1.1 * np.exp(0.15) + 1e-6
    other = simulate_case(image, SPACING, np.random.default_rng(1), LesionConfig(empty_fraction=1))
    assert not np.allclose(other.image, none.image)
    with pytest.raises(ValueError, match="contrast"):
        LesionConfig(min_contrast=0.7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("lesions") / "les"
    meta = build("mni152-lesions", out, train_cases=3, test_cases=2, thickness=16, gap=4, seed=1)
    return out, meta


def test_builder_writes_a_valid_binary_3d_dataset(tiny):
    out, meta = tiny
    assert verify_dataset(out) == []
    spec = load_dataset(out)
    assert len(spec.training) == 3 and len(spec.test) == 2
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert "SIMULATED lesions" in meta["description"]
    assert json.loads((out / "dataset.json").read_text()) == meta
    for entry in meta["medflow"]["split"]["train"] + meta["medflow"]["split"]["test"]:
        suffix = "Tr" if entry in meta["medflow"]["split"]["train"] else "Ts"
        img = nib.load(str(out / f"images{suffix}" / f"{entry['case']}_0000.nii.gz"))
        lab = np.asarray(nib.load(str(out / f"labels{suffix}" / f"{entry['case']}.nii.gz")).dataobj)
        z0, z1 = entry["slices"]
        assert img.shape == lab.shape == (197, 233, z1 - z0)  # native 1 mm grid
        assert np.allclose(img.header.get_zooms(), (1, 1, 1))
        assert np.allclose(img.affine[:3, 3], [-98.0, -134.0, -72.0 + z0])
        assert set(np.unique(lab).tolist()) <= {0, 1}
        assert int(lab.sum()) == sum(lesion["voxels"] for lesion in entry["lesions"])
        data = np.asarray(img.dataobj)
        assert data.dtype == np.int16 and 0.5 * INTENSITY_SCALE < data.max() < 2 * INTENSITY_SCALE


def test_train_and_test_slabs_are_disjoint_with_a_gap(tiny):
    _, meta = tiny
    split, gap = meta["medflow"]["split"], meta["medflow"]["slab_gap"]
    assert gap == 4 and meta["medflow"]["test_slabs"] == [2]
    train = {tuple(c["slices"]) for c in split["train"]}
    test = {tuple(c["slices"]) for c in split["test"]}
    assert len(train) == 3 and len(test) == 1  # cases go round their split's slabs
    for a0, a1 in train:
        for b0, b1 in test:
            assert b0 - a1 >= gap or a0 - b1 >= gap
    with pytest.raises(MedflowError, match="leave no slab"):
        build("mni152-lesions", meta_out := (tiny[0].parent / "x"), test_slabs=(99,))
    assert not meta_out.exists()
