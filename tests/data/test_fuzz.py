"""Property-based fuzzing of what medflow reads from users: ``dataset.json`` and image files.

Whatever the input, the outcome is a result or one clear :class:`MedflowError` line; never a
KeyError, TypeError, RecursionError, a traceback from a reader, or a message on several lines.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from medflow.data.io import read_image, read_label
from medflow.data.layout import DatasetSpec, load_dataset, verify_dataset
from medflow.errors import DataError, MedflowError
from medflow.metrics.summary import evaluate_folders

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow],
)

# ----------------------------------------------------------------------------- helpers


def assert_clear(exc: MedflowError) -> None:
    message = str(exc)
    assert message and "\n" not in message and "\r" not in message, message
    assert len(message) < 1000, message


SHAPE = (6, 5, 3)


def write_case_files(root: Path) -> None:
    """Two labelled cases, as nnU-Net (``case_0000``) and as MSD (one file per case)."""
    rng = np.random.default_rng(0)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for case in ("case00", "case01"):
        image = rng.normal(50, 10, SHAPE).astype(np.float32)
        label = rng.integers(0, 3, SHAPE).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"{case}.nii.gz"))


NNUNET_META = {
    "channel_names": {"0": "T1"},
    "labels": {"background": 0, "a": 1, "b": 2},
    "numTraining": 2,
    "file_ending": ".nii.gz",
}
MSD_META = {
    "modality": {"0": "CT"},
    "labels": {"0": "background", "1": "a", "2": "b"},
    "numTraining": 2,
    "training": [
        {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
        for c in ("case00", "case01")
    ],
    "test": [],
}
VOCABULARY = [
    *NNUNET_META,
    *MSD_META,
    "name",
    "image",
    "label",
    "background",
    "ignore",
    "0",
    "1",
    "2",
    "00",
]
INTERESTING = [
    ".nii.gz",
    ".nii",
    ".png",
    ".tif",
    ".mha",
    "./imagesTr/case00.nii.gz",
    "./labelsTr/case00.nii.gz",
    "imagesTr/case01_0000.nii.gz",
    "/absolute/x.nii.gz",
    "../outside.nii.gz",
    "CT",
    "noNorm",
    "ignore",
    "0",
    "1",
    "0\n",
    "²",
    "",
    "\x00.nii.gz",
    "\ud800",
    "x" * 300 + ".nii.gz",
    "9" * 5000,
]

keys = st.sampled_from(VOCABULARY + INTERESTING) | st.text(max_size=8)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(INTERESTING)
)
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=24,
)


@st.composite
def dataset_json(draw) -> object:
    """Near-valid metadata (a real layout with keys dropped, changed or added) or any JSON."""
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)
    base = dict(draw(st.sampled_from([NNUNET_META, MSD_META, {}])))
    chosen = st.sets(st.sampled_from(sorted(base) or ["name"]), max_size=2)
    for key in draw(chosen):
        base.pop(key, None)
    for key in draw(chosen):  # change inside: a label entry, a training pair
        value = base.get(key)
        if isinstance(value, dict):
            base[key] = {**value, **draw(st.dictionaries(keys, json_values, max_size=2))}
        elif isinstance(value, list):
            pairs = st.fixed_dictionaries({"image": leaves, "label": leaves})
            base[key] = value[1:] + draw(st.lists(pairs | json_values, min_size=1, max_size=2))
    base.update(draw(st.dictionaries(keys, json_values, max_size=3)))
    return base


def dumps(value: object) -> bytes:
    return json.dumps(value).encode("utf-8")


# ------------------------------------------------------------------------- dataset.json


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "ds"
    write_case_files(root)
    return root


def check_dataset(root: Path, raw: bytes) -> None:
    (root / "dataset.json").write_bytes(raw)
    try:
        spec = load_dataset(root)
    except MedflowError as exc:
        assert_clear(exc)
    else:
        assert isinstance(spec, DatasetSpec) and spec.training
    problems = verify_dataset(root)
    assert isinstance(problems, list)
    for line in problems:
        assert isinstance(line, str) and "\n" not in line, line


@FUZZ
@given(meta=dataset_json())
@example(meta=NNUNET_META)
@example(meta=MSD_META)
@example(meta={**NNUNET_META, "channel_names": {"0" * 5000: "T1"}})
@example(meta={**MSD_META, "labels": {"9" * 5000: "background"}})
@example(meta={**NNUNET_META, "labels": {"background": 0, "a\nb": [1, 2]}})
@example(meta={**MSD_META, "training": [{"image": "\x00.nii.gz", "label": "x.nii.gz"}]})
@example(meta={**MSD_META, "training": [{"image": "x" * 300 + ".nii.gz", "label": "y.nii.gz"}]})
@example(meta={**MSD_META, "training": [{"image": "\ud800.nii.gz", "label": "y.nii.gz"}]})
@example(meta={**NNUNET_META, "labels": {"background": 0, "\ud800": 1, "b": 2}})
def test_dataset_json_gives_a_spec_or_one_clear_error(dataset_root, meta):
    check_dataset(dataset_root, dumps(meta))


@FUZZ
@given(raw=st.binary(max_size=300))
@example(raw=b"[" * 100_000 + b"]" * 100_000)
@example(raw=b"1" * 5000)
@example(raw=b'{"labels": ' + b"9" * 5000 + b"}")
@example(raw=b"\xff\xfe{}")
@example(raw=b"NaN")
def test_any_bytes_as_dataset_json(dataset_root, raw):
    check_dataset(dataset_root, raw)


@pytest.fixture(scope="module")
def evaluation_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_eval")
    label = np.random.default_rng(0).integers(0, 3, (6, 5)).astype(np.uint8)
    for folder in ("labelsTs", "pred"):
        (root / folder).mkdir()
        Image.fromarray(label).save(root / folder / "a.png")
    return root


@FUZZ
@given(meta=dataset_json())
@example(meta={"labels": {"²": "a", "0": "background"}})
@example(meta={"labels": {"9" * 5000: "a"}})
@example(meta=[[[[]]]])
@example(meta={"labels": {"background": 0, "\ud800": 1, "b": 2}})
def test_evaluate_reads_labels_from_any_dataset_json(evaluation_root, meta):
    (evaluation_root / "dataset.json").write_bytes(dumps(meta))
    try:
        evaluate_folders(
            evaluation_root / "pred",
            evaluation_root / "labelsTs",
            evaluation_root / "out",
            force=True,
        )
    except MedflowError as exc:
        assert_clear(exc)


# ---------------------------------------------------------------------------- image files


def _nifti_bytes(array: np.ndarray, path: Path) -> bytes:
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.5, 2.0, 1.0])), str(path))
    return path.read_bytes()


def _png_bytes(array: np.ndarray, path: Path) -> bytes:
    Image.fromarray(array).save(path)
    return path.read_bytes()


def _tiff_bytes(array: np.ndarray, path: Path) -> bytes:
    tifffile.imwrite(path, array, photometric="minisblack")
    return path.read_bytes()


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    """Small valid files of every format, images and label maps: the seeds of mutation."""
    tmp = tmp_path_factory.mktemp("seeds")
    rng = np.random.default_rng(0)
    image = rng.normal(50, 10, (6, 5, 3)).astype(np.float32)
    label = rng.integers(0, 3, (6, 5, 3)).astype(np.uint8)
    grey = rng.integers(0, 255, (7, 6)).astype(np.uint8)
    rgb = rng.integers(0, 255, (7, 6, 3)).astype(np.uint8)
    return {
        "image.nii": _nifti_bytes(image, tmp / "i.nii"),
        "label.nii": _nifti_bytes(label, tmp / "l.nii"),
        "image.nii.gz": _nifti_bytes(image, tmp / "i.nii.gz"),
        "grey.png": _png_bytes(grey, tmp / "g.png"),
        "rgb.png": _png_bytes(rgb, tmp / "c.png"),
        "label.png": _png_bytes(label[:, :, 0], tmp / "l.png"),
        "page.tif": _tiff_bytes(image[:, :, 0], tmp / "p.tif"),
        "stack.tif": _tiff_bytes(np.moveaxis(label, -1, 0), tmp / "s.tif"),
    }


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("read")


BREAKERS = [
    b"\x00",
    b"\xff",
    b"\x00\x00",
    b"\xff\x7f",
    b"\x00\x80",
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\xff\xff\xff\x7f",
    b"\x00\x00\xc0\x7f",  # float32 NaN
    b"\x00\x00\x80\x7f",  # float32 +Inf
    b"\x00\x00\x80\xff",  # float32 -Inf
]


def check_read(path: Path) -> None:
    """``read_image`` and ``read_label`` return finite arrays of the documented shapes, or
    raise one clear DataError line."""
    try:
        image = read_image([path])
    except DataError as exc:
        assert_clear(exc)
    else:
        assert image.array.dtype == np.float32 and image.array.ndim == 4
        assert np.isfinite(image.array).all()
        assert image.array.shape[1:] == image.geometry.shape and min(image.array.shape) >= 1
        assert all(np.isfinite(s) and s > 0 for s in image.geometry.spacing)
    try:
        label = read_label(path)
    except DataError as exc:
        assert_clear(exc)
    else:
        assert label.array.dtype == np.int16 and label.array.shape == label.geometry.shape
        assert label.array.min() >= 0 and min(label.array.shape) >= 1


def _edited(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value) :]


def _complex_tiff(path: Path) -> None:
    tifffile.imwrite(path, np.ones((4, 5), np.complex64))


@pytest.mark.parametrize(
    ("name", "make", "problem"),
    [
        # NIfTI-1 header: dim[1] is the int16 at byte 42, pixdim[1] the float32 at byte 80
        ("image.nii", lambda raw: _edited(raw, 42, b"\x00\x00"), "holds no voxels"),
        ("image.nii", lambda raw: _edited(raw, 80, b"\x00\x00\xc0\x7f"), "non-finite voxel"),
        # the page.tif ImageLength tag's value (the height) at byte 30: 2**31 rows
        ("page.tif", lambda raw: _edited(raw, 30, b"\x00\x00\x00\x80"), "header declares"),
    ],
    ids=["nifti-zero-dim", "nifti-nan-spacing", "tiff-huge-height"],
)
def test_files_the_readers_cannot_trust(valid_files, scratch, name, make, problem):
    path = scratch / f"untrusted_{name}"
    path.write_bytes(make(valid_files[name]))
    with pytest.raises(DataError, match=problem) as info:
        read_image([path])
    assert_clear(info.value)


def test_complex_tiff_is_refused(scratch):
    path = scratch / "complex.tif"
    _complex_tiff(path)
    with pytest.raises(DataError, match="TIFF holds complex64 pixels"):
        read_image([path])


def test_seed_files_are_read(valid_files, scratch):
    for name, raw in valid_files.items():
        path = scratch / f"seed_{name}"
        path.write_bytes(raw)
        assert read_image([path]).array.size > 0, name


@FUZZ
@given(
    ending=st.sampled_from([".nii", ".nii.gz", ".png", ".tif"]),
    raw=st.binary(max_size=600),
)
def test_random_bytes_are_refused_clearly(scratch, ending, raw):
    path = scratch / f"random{ending}"
    path.write_bytes(raw)
    check_read(path)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
@example(data=None)
def test_damaged_files_are_read_or_refused_clearly(valid_files, scratch, data):
    if data is None:  # a NIfTI header whose first dimension is 0: no voxels
        name, raw = "image.nii", bytearray(valid_files["image.nii"])
        raw[42:44] = (0).to_bytes(2, "little")
    else:
        name = data.draw(st.sampled_from(sorted(valid_files)), label="seed")
        raw = bytearray(valid_files[name])
        if data.draw(st.booleans(), label="truncate"):
            raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")]
        # headers decide how much is read and allocated: aim most edits there, and write
        # the values that break parsers (0, -1, NaN, Inf, huge) as well as random bytes
        offsets = st.integers(0, min(len(raw), 400)) | st.integers(0, len(raw))
        values = st.binary(min_size=1, max_size=4) | st.sampled_from(BREAKERS)
        for offset, value in data.draw(st.lists(st.tuples(offsets, values), max_size=6)):
            raw[offset : offset + len(value)] = value
    path = scratch / f"damaged_{name}"
    path.write_bytes(bytes(raw))
    check_read(path)
