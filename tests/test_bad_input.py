"""Bad input through the CLI, one test per row of docs/ERRORS.md: exit code 2, exactly one line
on stderr naming the file or value and the problem, no traceback, and nothing new on disk.

Every test runs in its own ``tmp_path`` as the working directory, so the files it names are
relative paths (``ds/imagesTr/case01_0000.nii.gz``), as in the documentation."""

from __future__ import annotations

import errno
import gzip
import json
import os
import pathlib
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from conftest import TINY_TRAIN, make_nnunet_dataset, train_flags
from PIL import Image

from medflow.cli import main
from medflow.engine.checkpoint import load_checkpoint
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.train import train

TRAIN = train_flags(steps=1)
DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def png_model(tmp_path_factory):
    """One tiny model trained on 2D PNG images (one channel, labels 0..2), shared by the
    prediction rows."""
    root = tmp_path_factory.mktemp("png_model")
    data = make_nnunet_dataset(root / "ds", shape=(24, 20, 1), ending=".png", n_train=2)
    cfg = TrainConfig(steps=1, **{**TINY_TRAIN, "val_every": 10, "checkpoint_every": 10})
    return train(data, root / "run", cfg, quiet=True).final_checkpoint


def snapshot(root: Path = Path(".")) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` (hidden ones included) with size and mtime."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
        for p in root.rglob("*")
    }


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def fails(capsys, argv: list, *needles: str) -> str:
    """Run ``medflow argv``; assert exit 2, one line on stderr holding every needle, no
    traceback, and no file created, changed or removed. Returns the line."""
    before = snapshot()
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert err.endswith("\n") and err.strip().count("\n") == 0, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert snapshot() == before
    return err.strip()


def nifti_dataset(**kwargs) -> Path:
    return make_nnunet_dataset(Path("ds"), n_train=3, n_test=1, **kwargs)


def write_nifti(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def edit_nifti(path: Path, edit) -> None:
    """Change the values of a NIfTI file in place, keeping its grid and header."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    edit(data)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))


def train_or_verify(verb: str, data: Path = Path("ds")) -> list[str]:
    if verb == "train":
        return ["train", "--data", data, "--out", "run", *TRAIN]
    return ["datasets", "verify", data]


# ------------------------------------------------------------------- dataset.json and layout


def _no_json(root: Path) -> None:
    (root / "dataset.json").unlink()


def _malformed_json(root: Path) -> None:
    (root / "dataset.json").write_text('{"labels": {"background": 0,}}')


def _missing_key(root: Path) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    del meta["labels"]
    (root / "dataset.json").write_text(json.dumps(meta))


def _image_without_label(root: Path) -> None:
    (root / "labelsTr" / "case01.nii.gz").unlink()


def _label_without_image(root: Path) -> None:
    (root / "imagesTr" / "case01_0000.nii.gz").unlink()


def _missing_channel_file(root: Path) -> None:
    (root / "imagesTr" / "case01_0001.nii.gz").unlink()


def _empty_dataset(root: Path) -> None:
    for folder in ("imagesTr", "labelsTr"):
        for path in (root / folder).iterdir():
            path.unlink()


LAYOUT_ROWS = {
    "missing-dataset-json": (_no_json, "ds/dataset.json: not found"),
    "malformed-json": (_malformed_json, "ds/dataset.json: is not valid JSON"),
    "missing-key": (_missing_key, "ds/dataset.json: missing key 'labels'"),
    "image-without-label": (
        _image_without_label,
        "ds/imagesTr/case01_0000.nii.gz: image has no label; expected ds/labelsTr/case01.nii.gz",
    ),
    "label-without-image": (
        _label_without_image,
        "ds/labelsTr/case01.nii.gz: label has no image",
    ),
    "missing-channel-file": (
        _missing_channel_file,
        "ds/imagesTr/case01_0001.nii.gz: not found: channel 1 (MR1) of case 'case01'",
    ),
    "empty-dataset": (_empty_dataset, "ds/imagesTr: holds no training cases"),
}


@pytest.mark.parametrize("verb", ["train", "verify"])
@pytest.mark.parametrize("row", list(LAYOUT_ROWS))
def test_dataset_layout_problem(capsys, row, verb):
    break_it, message = LAYOUT_ROWS[row]
    break_it(nifti_dataset(channels=2 if row == "missing-channel-file" else 1))
    fails(capsys, train_or_verify(verb), message)


# ------------------------------------------------------------------------ file contents


def _shape_mismatch(root: Path) -> None:
    write_nifti(root / "labelsTr" / "case01.nii.gz", np.zeros((24, 20, 4), np.uint8))


def _undeclared_label(root: Path) -> None:
    edit_nifti(root / "labelsTr" / "case01.nii.gz", lambda label: label.__setitem__(0, 7))


def _nan_in_image(root: Path, value: float = np.nan) -> None:
    edit_nifti(root / "imagesTr" / "case01_0000.nii.gz", lambda image: image.__setitem__(3, value))


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CONTENT_ROWS = {
    # row: (break the dataset, message of train, message of verify)
    "shape-mismatch": (
        _shape_mismatch,
        "ds/labelsTr/case01.nii.gz: label has spatial shape (24, 20, 4), but image "
        "ds/imagesTr/case01_0000.nii.gz has (24, 20, 5)",
        "ds/labelsTr/case01.nii.gz: label has spatial shape (24, 20, 4), but image "
        "ds/imagesTr/case01_0000.nii.gz has (24, 20, 5)",
    ),
    "undeclared-label": (
        _undeclared_label,
        "ds/labelsTr/case01.nii.gz: holds label value 7, but dataset.json declares only 0..2",
        "ds/labelsTr/case01.nii.gz: label values [7] are not declared in dataset.json",
    ),
    "nan-in-image": (
        _nan_in_image,
        "ds/imagesTr/case01_0000.nii.gz: contains NaN or Inf values",
        "ds/imagesTr/case01_0000.nii.gz: contains NaN or Inf values",
    ),
    "inf-in-image": (
        lambda root: _nan_in_image(root, np.inf),
        "ds/imagesTr/case01_0000.nii.gz: contains NaN or Inf values",
        "ds/imagesTr/case01_0000.nii.gz: contains NaN or Inf values",
    ),
    "truncated-nifti": (
        lambda root: _truncated(root / "imagesTr" / "case01_0000.nii.gz"),
        "ds/imagesTr/case01_0000.nii.gz: cannot be read as NIfTI (corrupt or truncated?)",
        "ds/imagesTr/case01_0000.nii.gz: cannot be read as NIfTI (corrupt or truncated?)",
    ),
}


@pytest.mark.parametrize("verb", ["train", "verify"])
@pytest.mark.parametrize("row", list(CONTENT_ROWS))
def test_file_content_problem(capsys, row, verb):
    break_it, train_message, verify_message = CONTENT_ROWS[row]
    break_it(nifti_dataset())
    fails(capsys, train_or_verify(verb), train_message if verb == "train" else verify_message)


@pytest.mark.parametrize("verb", ["train", "verify"])
def test_corrupt_png(capsys, verb):
    data = make_nnunet_dataset(Path("ds"), shape=(24, 20, 1), ending=".png", n_train=3)
    _truncated(data / "labelsTr" / "case01.png")
    fails(
        capsys,
        train_or_verify(verb),
        "ds/labelsTr/case01.png: cannot be read as PNG (corrupt or truncated?)",
    )


def test_corrupt_tiff(capsys, png_model):
    Path("in").mkdir()
    tifffile.imwrite("in/scan.tif", np.random.rand(24, 20).astype(np.float32))
    _truncated(Path("in/scan.tif"))
    fails(
        capsys,
        ["predict", "--model", png_model, "--input", "in", "--out", "pred", "--quiet"],
        "in/scan.tif: cannot be read as TIFF (corrupt or truncated?)",
    )


def _mixed_dataset() -> Path:
    """Three 2D training cases stored as NIfTI (24, 20, 1), then case02 made a volume."""
    data = make_nnunet_dataset(Path("ds"), shape=(24, 20, 1), n_train=3, n_test=0)
    volume = np.random.default_rng(0).normal(50, 10, (24, 20, 5)).astype(np.float32)
    write_nifti(data / "imagesTr" / "case02_0000.nii.gz", volume)
    write_nifti(data / "labelsTr" / "case02.nii.gz", np.zeros((24, 20, 5), np.uint8))
    return data


def test_3d_volume_among_2d_images_verify(capsys):
    _mixed_dataset()
    fails(
        capsys,
        ["datasets", "verify", "ds"],
        "ds/imagesTr/case02_0000.nii.gz: is a 3D volume of shape (24, 20, 5), but 2 of 3 "
        "training cases are 2D images",
    )


def test_3d_test_case_among_2d_images_verify(capsys):
    data = make_nnunet_dataset(Path("ds"), shape=(24, 20, 1), n_train=2, n_test=1)
    volume = np.random.default_rng(0).normal(50, 10, (24, 20, 5)).astype(np.float32)
    write_nifti(data / "imagesTs" / "case02_0000.nii.gz", volume)
    (data / "labelsTs" / "case02.nii.gz").unlink()  # labelsTs is optional
    fails(
        capsys,
        ["datasets", "verify", "ds"],
        "ds/imagesTs/case02_0000.nii.gz: is a 3D volume of shape (24, 20, 5), but 2 of 2 "
        "training cases are 2D images",
    )


def test_reader_notes_stay_off_the_terminal():
    data = nifti_dataset()
    path = data / "imagesTr" / "case00_0000.nii.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[80:84] = struct.pack("<f", -1.0)  # pixdim[1] < 0: nibabel reads |pixdim|, and says so
    path.write_bytes(gzip.compress(bytes(raw)))
    # a process of its own: nibabel's log handler holds the stderr of the process it was
    # imported in, which pytest's capture does not see
    done = subprocess.run(
        [sys.executable, "-m", "medflow.cli", "datasets", "verify", "ds"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stderr) == (0, "") and "OK" in done.stdout


def test_3d_volume_among_2d_images_train(capsys):
    _mixed_dataset()
    fails(
        capsys,
        train_or_verify("train"),
        "ds/imagesTr/case02_0000.nii.gz: is a 3D volume of shape (24, 20, 5), but the first "
        "training case is a 2D image",
    )


# --------------------------------------------------------------------------- prediction


def predict_argv(model, inputs="in", out="pred", *extra) -> list:
    return ["predict", "--model", model, "--input", inputs, "--out", out, "--quiet", *extra]


def write_pngs(folder: str, n: int, shape=(24, 20)) -> Path:
    rng = np.random.default_rng(1)
    Path(folder).mkdir()
    for i in range(n):
        image = rng.integers(0, 200, shape).astype(np.uint8)
        Image.fromarray(image).save(Path(folder) / f"case{i:02d}.png")
    return Path(folder)


def test_3d_volume_for_a_2d_model(capsys, png_model):
    Path("in").mkdir()
    write_nifti(Path("in/vol_0000.nii.gz"), np.random.rand(24, 20, 5).astype(np.float32))
    fails(
        capsys,
        predict_argv(png_model),
        "in/vol_0000.nii.gz: is a 3D volume of shape (24, 20, 5) but the model was trained on "
        "2D images",
    )


def test_refine_start_outside_its_range(capsys, png_model):
    write_pngs("in", 1)
    argv = predict_argv(png_model, "in", "pred", "--sampler", "refine", "--refine-start", "0")
    fails(capsys, argv, "--refine-start 0.0: must be in (0, 1]")
    assert not Path("pred").exists()


def test_wrong_channel_count_at_predict(capsys, png_model):
    Path("in").mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (24, 20, 3)).astype(np.uint8)
    Image.fromarray(rgb).save("in/photo.png")
    fails(
        capsys,
        predict_argv(png_model),
        "in/photo.png: has 3 channel(s) but the model was trained on 1 (MR0)",
    )


def test_predict_output_exists_needs_force(capsys, png_model):
    write_pngs("in", 2)
    assert run(capsys, *predict_argv(png_model))[0] == 0
    fails(capsys, predict_argv(png_model), "pred/case00.png: already exists", "--force")
    code, out, _ = run(capsys, *predict_argv(png_model, "in", "pred", "--force"))
    assert code == 0 and "wrote 2 prediction(s)" in out


def test_predict_write_failure_mid_run_leaves_nothing(capsys, png_model, monkeypatch):
    import medflow.segmentation.predict as predict_module

    write_pngs("in", 3)
    real, calls = predict_module.write_volume, []

    def disk_full_on_second(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise DISK_FULL
        return real(path, *args, **kwargs)

    monkeypatch.setattr(predict_module, "write_volume", disk_full_on_second)
    fails(capsys, predict_argv(png_model), "pred/case01.png: cannot be written: No space left")
    assert len(calls) == 2  # the first output was written, then taken back


def test_different_image_size_is_not_an_error(capsys, png_model):
    write_pngs("in", 1, shape=(37, 52))  # trained on 24 x 20 at 16 x 16: resized both ways
    code, _, err = run(capsys, *predict_argv(png_model))
    assert code == 0, err
    assert np.asarray(Image.open("pred/case00.png")).shape == (37, 52)


def _edited_checkpoint(model: Path, edit) -> Path:
    ckpt = torch.load(model, map_location="cpu", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, "edited.pt")
    return Path("edited.pt")


def _wider_net(ckpt: dict) -> None:
    ckpt["net"]["channels"] = [16, 32]  # the weights are of an (8, 16) network


def _one_tensor_reshaped(ckpt: dict) -> None:
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.zeros(3)


@pytest.mark.parametrize("edit", [_wider_net, _one_tensor_reshaped], ids=["net", "tensor"])
def test_checkpoint_of_another_architecture(capsys, png_model, edit):
    model = _edited_checkpoint(png_model, edit)
    write_pngs("in", 1)
    fails(
        capsys,
        predict_argv(model),
        "edited.pt: weights do not match the architecture stored with them",
    )


def test_checkpoint_with_unusable_settings(capsys, png_model):
    model = _edited_checkpoint(png_model, lambda ckpt: ckpt["preprocessing"].pop("size"))
    write_pngs("in", 1)
    fails(
        capsys,
        predict_argv(model),
        "edited.pt: settings stored in the checkpoint are unusable",
    )


def test_checkpoint_of_an_unknown_format(capsys, png_model):
    model = _edited_checkpoint(png_model, lambda ckpt: ckpt.update(format="medflow-checkpoint-v9"))
    write_pngs("in", 1)
    fails(
        capsys,
        predict_argv(model),
        "edited.pt: checkpoint format 'medflow-checkpoint-v9' is not one this medflow reads",
    )


def test_not_a_checkpoint(capsys):
    Path("model.pt").write_text("these are not weights")
    write_pngs("in", 1)
    fails(capsys, predict_argv("model.pt"), "model.pt: not a readable checkpoint")


# --------------------------------------------------------------------------- evaluation


def evaluation_folders() -> None:
    """Two reference label maps and a prediction for each."""
    rng = np.random.default_rng(2)
    for folder in ("ref", "pred"):
        Path(folder).mkdir()
    for case in ("a", "b"):
        label = rng.integers(0, 3, (12, 10)).astype(np.uint8)
        Image.fromarray(label).save(f"ref/{case}.png")
        Image.fromarray(label).save(f"pred/{case}.png")


def evaluate_argv(*extra) -> list:
    return ["evaluate", "--pred", "pred", "--ref", "ref", "--out", "eval", *extra]


def test_evaluate_missing_prediction(capsys):
    evaluation_folders()
    Path("pred/b.png").unlink()
    fails(capsys, evaluate_argv(), "pred/b.png: not found: no prediction for ref/b.png")


def test_evaluate_output_exists_needs_force(capsys):
    evaluation_folders()
    assert run(capsys, *evaluate_argv())[0] == 0
    fails(capsys, evaluate_argv(), "eval: already exists and holds results; pass --force")
    assert run(capsys, *evaluate_argv("--force"))[0] == 0


def test_evaluate_write_failure_leaves_nothing(capsys, monkeypatch):
    evaluation_folders()
    real = pathlib.Path.write_text

    def disk_full_for_summary(self, *args, **kwargs):
        if self.name == "summary.json":
            raise DISK_FULL
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full_for_summary)
    # per_case.csv is written first and must not survive the failure of summary.json
    fails(capsys, evaluate_argv(), "eval/summary.json: cannot be written: No space left")


# ----------------------------------------------------------------------------- training


def test_train_output_exists_needs_force(capsys):
    nifti_dataset()
    Path("run").mkdir()
    Path("run/config.json").write_text("{}")
    fails(capsys, train_or_verify("train"), "run: already exists and holds results", "--force")
    code, out, err = run(capsys, *train_or_verify("train"), "--force")
    assert code == 0, err
    assert load_checkpoint(Path("run/checkpoint_final.pt"))["step"] == 1


def test_disk_full_while_training_is_one_line(capsys, monkeypatch):
    nifti_dataset()

    def disk_full(*args, **kwargs):
        raise DISK_FULL

    monkeypatch.setattr(torch, "save", disk_full)
    code, _, err = run(capsys, *train_or_verify("train"))
    assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err
    assert "run/checkpoint_best.pt: No space left on device" in err  # validated at step 1
    assert not any(p.name.startswith(".") for p in Path("run").iterdir())  # no temporary


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(capsys, monkeypatch):
    from medflow.flows.losses import LossTerms, MedFlowSegLoss

    nifti_dataset()
    real, calls = MedFlowSegLoss.__call__, []

    def nan_from_the_third_step(self, *args, **kwargs):
        terms = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) < 3:
            return terms
        return LossTerms(terms.total * float("nan"), terms.flow, terms.seg)

    monkeypatch.setattr(MedFlowSegLoss, "__call__", nan_from_the_third_step)
    argv = train_or_verify("train") + ["--steps", "4", "--checkpoint-every", "2"]
    code, _, err = run(capsys, *argv, "--val-every", "10")
    assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err
    assert "training diverged: loss is nan at step 3" in err and "run/checkpoint_last.pt" in err
    last = load_checkpoint(Path("run/checkpoint_last.pt"))
    assert last["step"] == 2
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert not Path("run/checkpoint_final.pt").exists()


# ----------------------------------------------------------------------------- datasets


def test_build_output_exists_needs_force(capsys):
    Path("dsb").mkdir()
    Path("dsb/notes.txt").write_text("mine")
    fails(capsys, ["datasets", "build", "dsb-nuclei", "--out", "dsb"], "dsb: already exists")
    code, _, err = run(capsys, "datasets", "build", "dsb-nuclei", "--out", "dsb", "--force")
    assert code == 0, err
    assert not Path("dsb/notes.txt").exists() and Path("dsb/dataset.json").is_file()


def test_build_write_failure_leaves_nothing(capsys, monkeypatch):
    real, calls = Image.Image.save, []

    def disk_full_on_fifth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise DISK_FULL
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full_on_fifth)
    argv = ["datasets", "build", "dsb-nuclei", "--out", "dsb"]
    fails(capsys, argv, "dsb: cannot be written: No space left on device")


# -------------------------------------------------------------------------- option values

cuda_present = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")

OPTION_ROWS = {
    "train-steps-0": (["--steps", "0"], "bad training option: steps and batch_size must be >= 1"),
    "train-size-20": (
        ["--channels", "8,16,32,64", "--size", "20"],
        "bad training option: size must be a multiple of 8 for 4 levels, got 20",
    ),
    "train-slice-axis-3": (
        ["--slice-axis", "3"],
        "slice_axis must be 0, 1 or 2 (got --slice-axis 3)",
    ),
    "train-steps-abc": (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    "train-device-cuda": (["--device", "cuda"], "--device 'cuda': CUDA is not available"),
    "predict-steps-0": (["--steps", "0"], "--steps 0: must be at least 1"),
    "predict-samples-0": (["--samples", "0"], "--samples 0: must be at least 1"),
    "predict-sampler-rk4": (["--sampler", "rk4"], "argument --sampler: invalid choice: 'rk4'"),
    "predict-device-cuda": (["--device", "cuda"], "--device 'cuda': CUDA is not available"),
}


@pytest.mark.parametrize(
    "row",
    [pytest.param(r, marks=cuda_present) if "cuda" in r else r for r in OPTION_ROWS],
)
def test_bad_option_value(capsys, png_model, row):
    extra, message = OPTION_ROWS[row]
    if row.startswith("train"):
        nifti_dataset()
        # the option comes last, so it overrides TRAIN's value
        argv = train_or_verify("train") + extra
    else:
        write_pngs("in", 1)
        argv = predict_argv(png_model, "in", "pred", *extra)
    fails(capsys, argv, message)
