"""Dataset layouts: parsing nnU-Net raw v2 and MSD folders, finding prediction inputs, and
verifying a dataset's files. Every dataset here is a few tiny files written in ``tmp_path``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from medflow.data.layout import Case, DatasetSpec, find_cases, load_dataset, verify_dataset
from medflow.errors import DataError

SHAPE_3D = (8, 9, 4)
SHAPE_2D = (12, 10)


# ----------------------------------------------------------------------------- writers


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def write_tiff(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array)
    return path


def write_array(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` in the format ``path``'s ending names."""
    if path.name.endswith(".png"):
        return write_png(path, array)
    if path.name.endswith(".tif"):
        return write_tiff(path, array)
    return write_nifti(path, array)


def image_array(ending: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = SHAPE_3D if ending.startswith(".nii") else SHAPE_2D
    dtype = np.float32 if ending.startswith(".nii") else np.uint8
    return rng.integers(0, 200, size=shape).astype(dtype)


def label_array(ending: str, num_classes: int = 3) -> np.ndarray:
    shape = SHAPE_3D if ending.startswith(".nii") else SHAPE_2D
    # every class present, deterministic
    return (np.arange(np.prod(shape)) % num_classes).reshape(shape).astype(np.uint8)


def write_json(root: Path, meta: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dataset.json"
    path.write_text(json.dumps(meta))
    return path


def nnunet_meta(ending: str, channels=("T1",), num_training: int = 2) -> dict:
    return {
        "name": "Dataset001_Tiny",
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": {"background": 0, "GM": 1, "WM": 2},
        "file_ending": ending,
        "numTraining": num_training,
    }


def make_nnunet(
    root: Path,
    ending: str = ".nii.gz",
    channels=("T1",),
    cases=("case_a", "case_b"),
    test_cases=(),
    test_labels: bool = False,
) -> Path:
    """An nnU-Net raw v2 dataset of tiny files; returns ``root``."""
    write_json(root, nnunet_meta(ending, channels, num_training=len(cases)))
    for split, names, labelled in (("Tr", cases, True), ("Ts", test_cases, test_labels)):
        for n, case in enumerate(names):
            for c in range(len(channels)):
                write_array(
                    root / f"images{split}" / f"{case}_{c:04d}{ending}", image_array(ending, n + c)
                )
            if labelled:
                write_array(root / f"labels{split}" / f"{case}{ending}", label_array(ending))
    return root


def make_msd(root: Path, with_test: bool = True) -> Path:
    """A Decathlon dataset: 4D NIfTI images (two modalities), macOS junk beside them."""
    meta = {
        "name": "BrainTumourTiny",
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "numTraining": 2,
        "training": [
            {
                "image": f"./imagesTr/BRATS_{i:03d}.nii.gz",
                "label": f"./labelsTr/BRATS_{i:03d}.nii.gz",
            }
            for i in (2, 1)
        ],
        "test": ["./imagesTs/BRATS_900.nii.gz"] if with_test else [],
    }
    write_json(root, meta)
    four_d = np.stack([image_array(".nii.gz", 0), image_array(".nii.gz", 1)], axis=-1)
    for i in (1, 2):
        write_nifti(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", four_d)
        write_nifti(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", label_array(".nii.gz"))
        # the MSD tarballs carry AppleDouble files; they must not count as cases
        (root / "imagesTr" / f"._BRATS_{i:03d}.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
    if with_test:
        write_nifti(root / "imagesTs" / "BRATS_900.nii.gz", four_d)
    return root


def raises_data_error(fn, *args) -> str:
    with pytest.raises(DataError) as info:
        fn(*args)
    return str(info.value)


# -------------------------------------------------------------------- loading good data


@pytest.mark.parametrize("ending", [".nii.gz", ".png", ".tif"])
def test_nnunet_single_channel_loads_and_verifies(tmp_path, ending):
    root = make_nnunet(tmp_path / "ds", ending=ending)
    (root / "imagesTr" / "notes.txt").write_text("ignored")
    (root / "labelsTr" / ".DS_Store").write_bytes(b"\x00")

    spec = load_dataset(root)

    assert isinstance(spec, DatasetSpec)
    assert spec.layout == "nnunet"
    assert spec.name == "Dataset001_Tiny"
    assert spec.file_ending == ending
    assert spec.channel_names == ("T1",)
    assert spec.labels == {"background": 0, "GM": 1, "WM": 2}
    assert spec.num_classes == 3 and spec.class_names == ("background", "GM", "WM")
    assert spec.training == (
        Case(
            "case_a",
            (root / "imagesTr" / f"case_a_0000{ending}",),
            root / "labelsTr" / f"case_a{ending}",
        ),
        Case(
            "case_b",
            (root / "imagesTr" / f"case_b_0000{ending}",),
            root / "labelsTr" / f"case_b{ending}",
        ),
    )
    assert spec.test == ()
    assert verify_dataset(root) == []


def test_nnunet_two_channels_in_channel_order(tmp_path):
    root = make_nnunet(tmp_path / "ds", channels=("FLAIR", "T1w"), cases=("b", "a"))
    spec = load_dataset(root)
    assert spec.channel_names == ("FLAIR", "T1w")
    assert [c.case_id for c in spec.training] == ["a", "b"]
    assert [p.name for p in spec.training[0].images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert verify_dataset(root) == []


def test_labels_are_sorted_by_value_whatever_the_json_order(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"WM": 2, "background": 0, "GM": 1}
    write_json(root, meta)
    spec = load_dataset(root)
    assert list(spec.labels) == ["background", "GM", "WM"]
    assert spec.class_names == ("background", "GM", "WM")


def test_test_cases_with_and_without_labels(tmp_path):
    unlabelled = load_dataset(make_nnunet(tmp_path / "u", test_cases=("t1", "t0")))
    assert [(c.case_id, c.label) for c in unlabelled.test] == [("t0", None), ("t1", None)]

    root = make_nnunet(tmp_path / "l", test_cases=("t0",), test_labels=True)
    labelled = load_dataset(root)
    assert labelled.test == (
        Case("t0", (root / "imagesTs" / "t0_0000.nii.gz",), root / "labelsTs" / "t0.nii.gz"),
    )
    assert verify_dataset(root) == []


def test_msd_four_d_multimodal(tmp_path):
    root = make_msd(tmp_path / "Task01")
    spec = load_dataset(root)
    assert spec.layout == "msd"
    assert spec.name == "BrainTumourTiny"
    assert spec.channel_names == ("FLAIR", "T1w")
    assert spec.labels == {"background": 0, "edema": 1, "tumour": 2}
    assert spec.file_ending == ".nii.gz"
    assert spec.training == tuple(
        Case(
            f"BRATS_{i:03d}",
            (root / "imagesTr" / f"BRATS_{i:03d}.nii.gz",),
            root / "labelsTr" / f"BRATS_{i:03d}.nii.gz",
        )
        for i in (1, 2)
    )
    assert spec.test == (Case("BRATS_900", (root / "imagesTs" / "BRATS_900.nii.gz",), None),)
    assert verify_dataset(root) == []


# ------------------------------------------------------------------ several raters


def add_raters(root: Path, split: str, cases, count: int, ending: str = ".nii.gz") -> list[Path]:
    """``raters{split}/{case}_rater01..`` for ``cases``, ``count`` files each; returns them."""
    paths = []
    for case in cases:
        for r in range(1, count + 1):
            path = root / f"raters{split}" / f"{case}_rater{r:02d}{ending}"
            paths.append(write_array(path, label_array(ending)))
    return paths


@pytest.mark.parametrize("ending", [".nii.gz", ".png"])
def test_raters_are_every_annotation_label_first(tmp_path, ending):
    root = make_nnunet(tmp_path / "ds", ending=ending, test_cases=("t0",), test_labels=True)
    add_raters(root, "Tr", ("case_a", "case_b"), 2, ending)
    (root / "ratersTr" / ".DS_Store").write_bytes(b"\x00")
    spec = load_dataset(root)
    a = spec.training[0]
    assert a.raters == (
        root / "labelsTr" / f"case_a{ending}",
        root / "ratersTr" / f"case_a_rater01{ending}",
        root / "ratersTr" / f"case_a_rater02{ending}",
    )
    assert len(spec.training[1].raters) == 3
    assert spec.test[0].raters == ()  # no ratersTs: one annotation
    assert verify_dataset(root) == []

    add_raters(root, "Ts", ("t0",), 4, ending)
    assert len(load_dataset(root).test[0].raters) == 5  # a split's count is its own


def test_dataset_without_raters_folder_has_no_raters(tmp_path):
    spec = load_dataset(make_nnunet(tmp_path / "ds"))
    assert all(case.raters == () for case in spec.training)


def test_missing_rater_file_is_named(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    add_raters(root, "Tr", ("case_a",), 3)
    add_raters(root, "Tr", ("case_b",), 2)
    message = raises_data_error(load_dataset, root)
    assert message.startswith(str(root / "ratersTr" / "case_b_rater03.nii.gz") + ": not found")
    assert "case 'case_b' has 3 annotation(s)" in message and "rater01..rater03" in message

    (root / "ratersTr" / "case_a_rater02.nii.gz").unlink()  # a gap, not a shorter list
    message = raises_data_error(load_dataset, root)
    assert message.startswith(str(root / "ratersTr" / "case_a_rater02.nii.gz") + ": not found")


def test_case_without_any_rater_file_is_named(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    add_raters(root, "Tr", ("case_a",), 1)
    message = raises_data_error(load_dataset, root)
    assert message.startswith(str(root / "ratersTr" / "case_b_rater01.nii.gz"))


def test_rater_without_label_or_misnamed_is_refused(tmp_path):
    root = make_nnunet(tmp_path / "ds", test_cases=("t0",))  # no labelsTs
    (orphan,) = add_raters(root, "Ts", ("t0",), 1)
    message = raises_data_error(load_dataset, root)
    assert message.startswith(str(orphan)) and "rater annotation has no label" in message
    assert str(root / "labelsTs" / "t0.nii.gz") in message
    orphan.unlink()

    for name, expected in (
        ("case_a_r1.nii.gz", "lacks the _raterNN suffix"),
        ("case_a_rater00.nii.gz", "rater 0 is the case's label map"),
    ):
        bad = write_nifti(root / "ratersTr" / name, label_array(".nii.gz"))
        message = raises_data_error(load_dataset, root)
        assert message.startswith(str(bad)) and expected in message
        bad.unlink()


def test_verify_checks_every_rater_file(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    add_raters(root, "Tr", ("case_a", "case_b"), 2)
    values = label_array(".nii.gz")
    values[0, 0, 0] = 9
    bad_value = write_nifti(root / "ratersTr" / "case_b_rater02.nii.gz", values)
    bad_shape = write_nifti(root / "ratersTr" / "case_a_rater01.nii.gz", np.zeros((8, 9, 5)))
    problems = verify_dataset(root)
    assert len(problems) == 2, problems
    assert problems[0].startswith(str(bad_shape)) and "(8, 9, 5)" in problems[0]
    assert problems[1].startswith(str(bad_value)) and "[9]" in problems[1]


# -------------------------------------------------------------------------- find_cases


def test_find_cases_groups_nnunet_channels(tmp_path):
    for case in ("b", "a"):
        for c in range(2):
            write_nifti(tmp_path / f"{case}_{c:04d}.nii.gz", image_array(".nii.gz"))
    (tmp_path / "readme.txt").write_text("ignored")

    cases = find_cases(tmp_path, ".nii.gz", num_channels=2)

    assert cases == [
        Case("a", (tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"), None),
        Case("b", (tmp_path / "b_0000.nii.gz", tmp_path / "b_0001.nii.gz"), None),
    ]


def test_find_cases_plain_files_are_cases_of_their_own(tmp_path):
    write_png(tmp_path / "scan2.png", image_array(".png"))
    write_png(tmp_path / "scan1.png", image_array(".png"))
    write_png(tmp_path / "x_0000.png", image_array(".png"))  # nnU-Net single-channel naming
    write_tiff(tmp_path / "other.tif", image_array(".tif"))

    cases = find_cases(tmp_path, ".png", num_channels=1)

    assert [(c.case_id, c.images) for c in cases] == [
        ("scan1", (tmp_path / "scan1.png",)),
        ("scan2", (tmp_path / "scan2.png",)),
        ("x", (tmp_path / "x_0000.png",)),
    ]
    # without a file ending every supported file counts
    assert [c.case_id for c in find_cases(tmp_path, None, 1)] == ["other", "scan1", "scan2", "x"]


def test_find_cases_single_file(tmp_path):
    path = write_nifti(tmp_path / "case_7_0000.nii.gz", image_array(".nii.gz"))
    assert find_cases(path, None, 1) == [Case("case_7", (path,), None)]
    message = raises_data_error(find_cases, path, None, 2)
    assert str(path) in message and "pass the folder" in message


def test_find_cases_wrong_channel_count_names_the_case(tmp_path):
    write_nifti(tmp_path / "a_0000.nii.gz", image_array(".nii.gz"))
    write_nifti(tmp_path / "a_0001.nii.gz", image_array(".nii.gz"))
    write_nifti(tmp_path / "b_0000.nii.gz", image_array(".nii.gz"))

    missing = raises_data_error(find_cases, tmp_path, ".nii.gz", 2)
    assert str(tmp_path / "b_0001.nii.gz") in missing and "case 'b'" in missing

    extra = raises_data_error(find_cases, tmp_path, ".nii.gz", 1)
    assert str(tmp_path / "a_0001.nii.gz") in extra
    assert "case 'a' has 2 channel files; the model takes 1" in extra


def test_find_cases_empty_folder_names_it(tmp_path):
    (tmp_path / "notes.txt").write_text("no images")
    message = raises_data_error(find_cases, tmp_path, ".nii.gz", 1)
    assert message.startswith(str(tmp_path)) and "holds no image files ending in .nii.gz" in message


# ------------------------------------------------------------------ load_dataset errors


def test_missing_dataset_json(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    message = raises_data_error(load_dataset, tmp_path)
    assert message.startswith(str(tmp_path / "dataset.json")) and "not found" in message


def test_missing_root(tmp_path):
    message = raises_data_error(load_dataset, tmp_path / "nope")
    assert message == f"{tmp_path / 'nope'}: dataset folder not found"


def test_malformed_json_says_where(tmp_path):
    (tmp_path / "dataset.json").write_text('{\n  "labels": {"background": 0,}\n}')
    message = raises_data_error(load_dataset, tmp_path)
    assert message.startswith(str(tmp_path / "dataset.json"))
    assert "not valid JSON" in message and "line 2 column" in message
    assert "\n" not in message


def test_json_must_be_an_object(tmp_path):
    (tmp_path / "dataset.json").write_text("[1, 2]")
    assert "must hold a JSON object, not an array" in raises_data_error(load_dataset, tmp_path)


@pytest.mark.parametrize(
    ("drop", "layout"), [("numTraining", "nnU-Net raw v2"), ("labels", "nnU-Net raw v2")]
)
def test_missing_key_names_key_and_layout(tmp_path, drop, layout):
    root = make_nnunet(tmp_path / "ds")
    meta = nnunet_meta(".nii.gz")
    del meta[drop]
    write_json(root, meta)
    message = raises_data_error(load_dataset, root)
    assert message.startswith(str(root / "dataset.json"))
    assert f"missing key '{drop}'" in message and layout in message


def test_msd_missing_key(tmp_path):
    root = make_msd(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    del meta["modality"]
    write_json(root, meta)
    message = raises_data_error(load_dataset, root)
    assert "missing key 'modality'" in message and "Medical Segmentation Decathlon" in message


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"background": 0, "whole": [1, 2], "core": 2}, "label 'whole' is region-based"),
        ({"background": 0, "GM": 1, "ignore": 2}, "label 'ignore'"),
        ({"background": 0, "GM": 1, "WM": 3}, "exactly 0..2"),
        ({"GM": 1, "WM": 2}, "background with value 0"),
        ({"background": 0, "GM": "1"}, "label 'GM' has value '1'; expected an integer"),
    ],
)
def test_unsupported_labels_are_rejected(tmp_path, labels, expected):
    root = make_nnunet(tmp_path / "ds")
    write_json(root, {**nnunet_meta(".nii.gz"), "labels": labels})
    message = raises_data_error(load_dataset, root)
    assert message.startswith(str(root / "dataset.json")) and expected in message


def test_wrong_types_and_endings_in_json(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    write_json(root, {**nnunet_meta(".nii.gz"), "channel_names": ["T1"]})
    assert "'channel_names' must be a non-empty object" in raises_data_error(load_dataset, root)
    write_json(root, {**nnunet_meta(".nii.gz"), "file_ending": ".mha"})
    assert "file_ending '.mha' is not supported" in raises_data_error(load_dataset, root)


def test_image_without_label(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    (root / "labelsTr" / "case_b.nii.gz").unlink()
    message = raises_data_error(load_dataset, root)
    assert message.startswith(str(root / "imagesTr" / "case_b_0000.nii.gz"))
    assert "has no label" in message and str(root / "labelsTr" / "case_b.nii.gz") in message


def test_label_without_image(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    write_nifti(root / "labelsTr" / "case_c.nii.gz", label_array(".nii.gz"))
    message = raises_data_error(load_dataset, root)
    assert message.startswith(str(root / "labelsTr" / "case_c.nii.gz"))
    assert "label has no image" in message


def test_missing_channel_file(tmp_path):
    root = make_nnunet(tmp_path / "ds", channels=("FLAIR", "T1w"))
    (root / "imagesTr" / "case_a_0001.nii.gz").unlink()
    message = raises_data_error(load_dataset, root)
    assert message.startswith(str(root / "imagesTr" / "case_a_0001.nii.gz"))
    assert "channel 1 (T1w) of case 'case_a'" in message


def test_image_without_channel_suffix(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    write_nifti(root / "imagesTr" / "case_c.nii.gz", image_array(".nii.gz"))
    message = raises_data_error(load_dataset, root)
    assert message.startswith(str(root / "imagesTr" / "case_c.nii.gz"))
    assert "lacks the _XXXX channel suffix" in message


def test_empty_dataset(tmp_path):
    root = make_nnunet(tmp_path / "ds", cases=())
    (root / "imagesTr").mkdir()
    message = raises_data_error(load_dataset, root)
    assert message.startswith(str(root / "imagesTr")) and "no training cases" in message


def test_msd_unlisted_image_is_an_image_without_label(tmp_path):
    root = make_msd(tmp_path / "ds")
    write_nifti(root / "imagesTr" / "BRATS_003.nii.gz", image_array(".nii.gz"))
    message = raises_data_error(load_dataset, root)
    assert message.startswith(str(root / "imagesTr" / "BRATS_003.nii.gz"))
    assert "not listed in dataset.json 'training'" in message


# ------------------------------------------------------------------- verify_dataset


def only_problem(root: Path) -> str:
    problems = verify_dataset(root)
    assert len(problems) == 1, problems
    assert "\n" not in problems[0]
    return problems[0]


def test_verify_reports_load_errors_as_one_problem(tmp_path):
    assert only_problem(tmp_path) == f"{tmp_path / 'dataset.json'}: " + (
        "not found; a dataset folder needs a dataset.json (nnU-Net or MSD)"
    )


def test_verify_truncated_nifti(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    path = root / "imagesTr" / "case_b_0000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    problem = only_problem(root)
    assert problem.startswith(f"{path}: cannot be read as NIfTI")


def test_verify_truncated_png(tmp_path):
    root = make_nnunet(tmp_path / "ds", ending=".png")
    path = root / "labelsTr" / "case_a.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 30])
    problem = only_problem(root)
    assert problem.startswith(f"{path}: cannot be read as PNG")


def test_verify_shape_mismatch(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    label = write_nifti(root / "labelsTr" / "case_a.nii.gz", np.zeros((8, 9, 5), np.uint8))
    problem = only_problem(root)
    assert problem.startswith(str(label))
    assert "(8, 9, 5)" in problem and "(8, 9, 4)" in problem
    assert str(root / "imagesTr" / "case_a_0000.nii.gz") in problem


def test_verify_affine_mismatch_beyond_tolerance_only(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    label = root / "labelsTr" / "case_a.nii.gz"
    nudged = np.eye(4)
    nudged[0, 3] = 0.005  # within the 0.01 mm origin tolerance
    write_nifti(label, label_array(".nii.gz"), nudged)
    assert verify_dataset(root) == []

    moved = np.diag([1.0, 1.0, 2.0, 1.0])
    moved[:3, 3] = (5.0, 0.0, 0.0)
    write_nifti(label, label_array(".nii.gz"), moved)
    problems = verify_dataset(root)
    assert len(problems) == 2
    assert all(p.startswith(str(label)) for p in problems)
    assert "spacing (1, 1, 2)" in problems[0] and "origin (5, 0, 0)" in problems[1]


def test_verify_undeclared_label_value(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    label = root / "labelsTr" / "case_b.nii.gz"
    values = label_array(".nii.gz")
    values[0, 0, 0] = 5
    write_nifti(label, values)
    problem = only_problem(root)
    assert problem == (
        f"{label}: label values [5] are not declared in dataset.json (allowed: 0, 1, 2)"
    )


def test_verify_nan_in_image(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    image = root / "imagesTr" / "case_a_0000.nii.gz"
    values = image_array(".nii.gz")
    values[1, 2, 3] = np.nan
    write_nifti(image, values)
    assert only_problem(root) == f"{image}: contains NaN or Inf values"


def test_verify_wrong_num_training(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    write_json(root, nnunet_meta(".nii.gz", num_training=3))
    problem = only_problem(root)
    assert problem.startswith(str(root / "dataset.json"))
    assert "numTraining is 3, but 2 training cases were found" in problem


def test_verify_wrong_channel_count(tmp_path):
    root = make_msd(tmp_path / "ds")
    image = root / "imagesTr" / "BRATS_001.nii.gz"
    write_nifti(image, image_array(".nii.gz"))  # 3D: one modality where two are declared
    problem = only_problem(root)
    assert problem.startswith(str(image))
    assert "has 1 image channel(s), but dataset.json declares 2" in problem


def test_verify_collects_every_problem(tmp_path):
    root = make_nnunet(tmp_path / "ds", cases=("a", "b", "c"))
    (root / "imagesTr" / "a_0000.nii.gz").write_bytes(b"not a nifti")
    write_nifti(root / "labelsTr" / "b.nii.gz", np.full(SHAPE_3D, 7, np.uint8))
    write_json(root, nnunet_meta(".nii.gz", num_training=1))

    problems = verify_dataset(root)

    assert len(problems) == 3, problems
    assert problems[0].startswith(str(root / "dataset.json"))
    assert problems[1].startswith(str(root / "imagesTr" / "a_0000.nii.gz"))
    assert problems[2].startswith(str(root / "labelsTr" / "b.nii.gz"))
    assert "[7]" in problems[2]


def test_class_names_follow_values_not_insertion_order(tmp_path):
    spec = DatasetSpec(tmp_path, "x", "nnunet", ("T1",), {"b": 2, "bg": 0, "a": 1}, ".png", (), ())
    assert spec.class_names == ("bg", "a", "b") and spec.num_classes == 3
