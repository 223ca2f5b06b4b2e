"""End-to-end: the CLI trains on a tiny dataset made here, predicts, evaluates, and the test
reads the files it wrote."""

import csv
import json

import nibabel as nib
import numpy as np
from conftest import make_nnunet_dataset, train_flags

from medflow.cli import main

TRAIN = train_flags(steps=3, val_every=3)


def test_train_predict_evaluate(tmp_path, capsys):
    data = make_nnunet_dataset(tmp_path / "ds")
    assert main(["datasets", "verify", str(data)]) == 0
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TRAIN]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "checkpoint_final.pt" in out
    ckpt = tmp_path / "run" / "checkpoint_final.pt"
    assert (
        main(
            [
                "predict",
                "--model",
                str(ckpt),
                "--input",
                str(data / "imagesTs"),
                "--out",
                str(tmp_path / "pred"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred"),
                "--ref",
                str(data / "labelsTs"),
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "foreground mean" in printed and "Dice" in printed

    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 2 and set(summary["mean"]) == {"a", "b"}
    rows = list(csv.DictReader((tmp_path / "eval" / "per_case.csv").read_text().splitlines()))
    assert len(rows) == 4 and {r["case"] for r in rows} == {"case04", "case05"}
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0
    # the reported mean is the mean of the per-case rows
    dice_a = [float(r["dice"]) for r in rows if r["class"] == "a"]
    assert abs(summary["mean"]["a"]["dice"] - np.mean(dice_a)) < 1e-9
    pred = nib.load(str(tmp_path / "pred" / "case04.nii.gz"))
    ref = nib.load(str(data / "labelsTs" / "case04.nii.gz"))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "missing: dataset folder not found" in err
    assert not (tmp_path / "r").exists()

    assert (
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--size", "20"]) == 2
    )
    assert "size must be a multiple of 8" in capsys.readouterr().err

    assert (
        main(
            [
                "predict",
                "--model",
                str(tmp_path / "nope.pt"),
                "--input",
                str(tmp_path),
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "nope.pt: checkpoint not found" in capsys.readouterr().err


def test_verify_reports_problems_and_exits_2(tmp_path, capsys):
    data = make_nnunet_dataset(tmp_path / "ds")
    lab = data / "labelsTr" / "case01.nii.gz"
    img = nib.load(str(lab))
    bad = np.asarray(img.dataobj).copy()
    bad[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(bad, img.affine), str(lab))
    assert main(["datasets", "verify", str(data)]) == 2
    err = capsys.readouterr().err
    assert str(lab) in err and "[7]" in err


def test_datasets_list(capsys):
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    assert "mni152-tissue" in out and "dsb-nuclei" in out
