import json

import nibabel as nib
import numpy as np
import pytest

from medflow.cli import main
from medflow.data import builtin
from medflow.data.builtin import build, mni152_slabs, reference_order
from medflow.data.layout import load_dataset, verify_dataset
from medflow.data.raters import simulate_raters
from medflow.data.shift import SITES
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


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin") / "mni-shifted"
    return out, build("mni152-tissue-shifted", out)


def _nifti(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def test_shifted_mni152_keeps_layout_and_labels_and_changes_images(mni, shifted):
    (src, src_meta), (out, meta) = mni, shifted
    assert verify_dataset(out) == []
    assert meta["medflow"]["split"] == src_meta["medflow"]["split"]
    assert meta["labels"] == src_meta["labels"] and meta["numTraining"] == 8
    assert meta["medflow"]["site"] == "site-b"
    assert meta["medflow"]["simulated_shift"] == SITES["site-b"].to_dict()
    assert "simulated" in meta["description"]
    spec, src_spec = load_dataset(out), load_dataset(src)
    assert len(spec.training) == 8 and len(spec.test) == 3
    for case, src_case in zip(spec.training + spec.test, src_spec.training + src_spec.test):
        assert case.case_id == src_case.case_id
        label, affine = _nifti(case.label)
        src_label, src_affine = _nifti(src_case.label)
        assert np.array_equal(label, src_label) and np.array_equal(affine, src_affine)
        image, _ = _nifti(case.images[0])
        src_image, _ = _nifti(src_case.images[0])
        # same head (nonzero set, so the same crop box), other intensities
        assert np.array_equal(image != 0, src_image != 0)
        assert np.abs(image - src_image)[src_image != 0].mean() > 0.05


def test_shifted_mni152_references_come_from_training_slabs(shifted):
    out, meta = shifted
    refs = meta["medflow"]["references"]
    assert [r["file"] for r in refs] == [f"references/ref_{i:02d}_0000.nii.gz" for i in range(10)]
    assert sorted(p.name for p in (out / "references").iterdir()) == [
        *(f"ref_{i:02d}_0000.nii.gz" for i in range(10)),
        builtin.REFERENCE_SLICES,
    ]
    chosen = json.loads((out / "references" / builtin.REFERENCE_SLICES).read_text())
    assert chosen["slice_axis"] == 2
    train = {c["case"]: c["slices"] for c in meta["medflow"]["split"]["train"]}
    test = [c["slices"] for c in meta["medflow"]["split"]["test"]]
    for ref in refs:
        z0, z1 = train[ref["case"]]  # KeyError: a test slab
        assert ref["case"] == f"mni152_slab{ref['slab']:02d}" and z0 <= ref["slice"] < z1
        assert not any(t0 <= ref["slice"] < t1 for t0, t1 in test)
        image, affine = _nifti(out / ref["file"])
        slab, slab_affine = _nifti(out / "imagesTr" / f"{ref['case']}_0000.nii.gz")
        # the reference is the shifted training slab in its place in the template, with the
        # reference slice named, so it is cropped and normalised as a target scan would be
        assert np.array_equal(image, slab) and np.allclose(affine, slab_affine)
        assert chosen["slices"][ref["file"].split("/")[-1]] == [ref["slice"] - z0]
    # the first five references lie in five different slabs
    assert len({r["slab"] for r in refs[:5]}) == 5


@pytest.mark.parametrize("k", [1, 5, 10])
def test_first_k_references_spread_over_the_range(k):
    slices = [(z // 12, z) for z in range(96)]
    picks = reference_order(slices, 10)[:k]
    assert len(set(picks)) == k and picks[0] == (4, 48)  # the first is the middle
    edges = sorted([-1] + [z for _, z in picks] + [96])
    # no gap wider than twice that of K evenly spaced picks
    assert max(b - a for a, b in zip(edges, edges[1:])) <= 2 * 96 / (k + 1)
    with pytest.raises(ValueError):
        reference_order(slices, 97)


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


# ----------------------------------------------------------------------- mni152-raters


def tiny_template(shape=(10, 9, 40)):
    """A stand-in for the MNI152 template: smooth random tissue probabilities on a grid of
    ``shape``, 1 x 1 x 2 mm, with the origin of nilearn's."""
    rng = np.random.default_rng(3)
    logits = np.stack([np.cumsum(rng.normal(size=shape), axis=2) for _ in range(3)])
    probs = np.exp(logits - logits.max(axis=0))
    probs = (probs / probs.sum(axis=0)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = (-98.0, -134.0, -72.0)
    image = (100.0 * (1 + probs[1] + 2 * probs[2])).astype(np.float32)
    labels = np.argmax(probs, axis=0).astype(np.uint8)
    return builtin._Template(image, labels, probs, affine)


def rater_files(root, split, case, n):
    return [root / f"labels{split}" / f"{case}.nii.gz"] + [
        root / f"raters{split}" / f"{case}_rater{r:02d}.nii.gz" for r in range(1, n)
    ]


def test_raters_writer_cuts_raters_drawn_on_the_whole_volume(tmp_path, monkeypatch):
    template = tiny_template()
    monkeypatch.setattr(builtin, "_mni152_template", lambda: template)
    out = tmp_path / "raters"
    argv = ["datasets", "build", "mni152-raters", "--out", str(out)]
    assert main([*argv, "--raters", "3", "--correlation-mm", "2"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    extra = meta["medflow"]
    assert extra["builtin"] == "mni152-raters" and extra["raters"] == 3
    assert extra["rater_correlation_mm"] == 2.0 and extra["rater_seed"] == 0
    assert "SIMULATED" in meta["description"] and meta["labels"] == builtin.MNI152_LABELS
    # 40 slices: slabs 0-11, 14-25, 28-39; the third is the test split
    assert [c["slices"] for c in extra["split"]["train"]] == [[0, 12], [14, 26]]
    assert [c["slices"] for c in extra["split"]["test"]] == [[28, 40]]
    assert verify_dataset(out) == []

    # the raters are one draw on the whole template (1 x 1 x 2 mm), cut as the slabs are
    drawn = simulate_raters(template.probabilities, 3, 2.0, (1, 1, 2), np.random.default_rng(0))
    spec = load_dataset(out)
    for case, entry in zip(
        spec.training + spec.test, extra["split"]["train"] + extra["split"]["test"], strict=True
    ):
        z0, z1 = entry["slices"]
        split = "Ts" if entry in extra["split"]["test"] else "Tr"
        assert case.raters == tuple(rater_files(out, split, case.case_id, 3))
        for r, path in enumerate(case.raters):
            label, affine = _nifti(path)
            assert label.dtype == np.uint8 and np.array_equal(label, drawn[r, :, :, z0:z1])
            assert np.allclose(affine[:3, 3], [-98.0, -134.0, -72.0 + 2 * z0])
        probs, p_affine = _nifti(out / f"probabilities{split}" / f"{case.case_id}.nii.gz")
        assert probs.dtype == np.float32 and probs.shape == (10, 9, z1 - z0, 3)
        assert np.array_equal(np.moveaxis(probs, -1, 0), template.probabilities[..., z0:z1])
        assert np.array_equal(p_affine, affine)


def test_rater_options_belong_to_mni152_raters(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["datasets", "build", "mni152-tissue", "--out", str(out), "--raters", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--raters: only for mni152-raters" in err
    argv = ["datasets", "build", "mni152-raters", "--out", str(out)]
    assert main([*argv, "--raters", "1"]) == 2
    assert "at least 2, got 1" in capsys.readouterr().err
    assert main([*argv, "--correlation-mm", "-1"]) == 2
    assert "--correlation-mm must be a length >= 0" in capsys.readouterr().err
    assert not out.exists()


def test_mni152_raters_real_template(tmp_path, mni):
    # the one build of the real 1 mm template here: 3 raters, about 10 s
    src, src_meta = mni
    out = tmp_path / "raters"
    argv = ["datasets", "build", "mni152-raters", "--out", str(out)]
    assert main([*argv, "--raters", "3", "--correlation-mm", "2"]) == 0
    for folder in ("imagesTr", "labelsTr", "ratersTr", "probabilitiesTr"):
        assert len(list((out / folder).iterdir())) == 8 * (2 if folder == "ratersTr" else 1)
    for folder in ("imagesTs", "labelsTs", "ratersTs", "probabilitiesTs"):
        assert len(list((out / folder).iterdir())) == 3 * (2 if folder == "ratersTs" else 1)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["medflow"]["split"] == src_meta["medflow"]["split"]
    assert verify_dataset(out) == []
    spec, src_spec = load_dataset(out), load_dataset(src)
    case, src_case = spec.test[1], src_spec.test[1]
    image, affine = _nifti(case.images[0])
    src_image, src_affine = _nifti(src_case.images[0])
    assert np.array_equal(image, src_image) and np.array_equal(affine, src_affine)
    probs, _ = _nifti(out / "probabilitiesTs" / f"{case.case_id}.nii.gz")
    assert probs.shape == (197, 233, 12, 3) and np.allclose(probs.sum(axis=-1), 1, atol=1e-6)
    raters = np.stack([_nifti(p)[0] for p in case.raters])
    argmax, _ = _nifti(src_case.label)
    # certain voxels: every rater agrees with the argmax labels of mni152-tissue
    certain = probs.max(axis=-1) > 0.999
    assert certain.mean() > 0.3 and all(np.array_equal(r[certain], argmax[certain]) for r in raters)
    # ambiguous voxels: the raters disagree, and not all alike
    ambiguous = (probs[..., 1] > 0.3) & (probs[..., 1] < 0.7)
    assert 0.3 < (raters[0] != raters[1])[ambiguous].mean() < 0.7
