"""Per-case scores and folder evaluation: values, files written, and the errors a user sees."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medflow.errors import DataError, OutputExistsError
from medflow.metrics.summary import evaluate_case, evaluate_folders, format_summary
from medflow.metrics.surface import surface_metrics

SPACING = (2.0, 1.0, 3.0)


def _nifti(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([*SPACING, 1.0])), str(path))


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_case_scores_foreground_classes_only():
    ref = np.zeros((6, 8), dtype=np.int16)
    pred = np.zeros_like(ref)
    ref[1:3, 1:3] = 1
    pred[1:3, 1:4] = 1  # 4 of ref's 4 voxels plus 2 more: dice 8/10, iou 4/6
    ref[4, 6] = 2  # missed
    labels = {"background": 0, "a": 1, "b": 2}
    out = evaluate_case(pred, ref, labels, (1.0, 0.5))
    assert list(out) == ["a", "b"]
    assert out["a"]["dice"] == pytest.approx(0.8)
    assert out["a"]["iou"] == pytest.approx(4 / 6)
    # pred's extra column 3 is 1 column (0.5 mm) from ref's surface
    assert out["a"]["hd95"] == pytest.approx(0.5)
    assert (out["a"]["ref_voxels"], out["a"]["pred_voxels"]) == (4, 6)
    diagonal = math.hypot(5 * 1.0, 7 * 0.5)
    assert out["b"] == pytest.approx(
        {"dice": 0, "iou": 0, "hd95": diagonal, "assd": diagonal, "ref_voxels": 1, "pred_voxels": 0}
    )
    with pytest.raises(ValueError, match="differs"):
        evaluate_case(pred, ref[:5], labels, (1.0, 1.0))


def _write_nifti_study(tmp_path):
    """Two NIfTI cases with 2x1x3 mm voxels; returns (pred_dir, ref_dir, ref and pred arrays)."""
    shape = (12, 10, 3)
    ref_a, pred_a = np.zeros(shape), np.zeros(shape)
    ref_a[1:5, 1:5, :] = pred_a[1:5, 1:5, :] = 1  # liver exact
    ref_a[7:10, 5:8, 1] = 2  # tumour, one slice thick,
    pred_a[8:11, 5:8, 1] = 2  # predicted one row (2 mm) further along axis 0
    ref_b, pred_b = np.zeros(shape), np.zeros(shape)
    ref_b[1:5, 1:5, :] = 1
    pred_b[1:5, 1:5, :2] = 1  # 32 of 48 voxels: dice 64/80, iou 32/48
    ref_b[2:4, 6:8, 2] = 2  # tumour missed
    for case, ref, pred in (("a", ref_a, pred_a), ("b", ref_b, pred_b)):
        _nifti(tmp_path / "labelsTr" / f"{case}.nii.gz", ref)
        _nifti(tmp_path / "pred" / f"{case}.nii.gz", pred)
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}})
    )
    return tmp_path / "pred", tmp_path / "labelsTr", (ref_b, pred_b)


def test_evaluate_folders_nifti_end_to_end(tmp_path):
    pred_dir, ref_dir, (ref_b, pred_b) = _write_nifti_study(tmp_path)
    out = tmp_path / "eval"
    summary = evaluate_folders(pred_dir, ref_dir, out)

    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["labels"] == {"background": 0, "liver": 1, "tumour": 2}  # from dataset.json
    assert summary["n_cases"] == 2 and summary["spacing_source"] == "reference"
    assert "empty" in summary["policy"]
    assert [(c["case"], c["pred"]) for c in summary["per_case"]] == [
        ("a", str(pred_dir / "a.nii.gz")),
        ("b", str(pred_dir / "b.nii.gz")),
    ]

    rows = _read_csv(out / "per_case.csv")
    assert [(r["case"], r["class"]) for r in rows] == [
        ("a", "liver"),
        ("a", "tumour"),
        ("b", "liver"),
        ("b", "tumour"),
    ]
    numbers = ("dice", "iou", "hd95", "assd", "ref_voxels", "pred_voxels")
    val = {(r["case"], r["class"]): {k: float(r[k]) for k in numbers} for r in rows}
    assert val["a", "liver"] == pytest.approx(
        {"dice": 1, "iou": 1, "hd95": 0, "assd": 0, "ref_voxels": 48, "pred_voxels": 48}
    )
    # tumour a: 3x3 one-slice squares overlapping in 2 of 3 rows, so dice 12/18, iou 6/12. A
    # one-voxel-thick slab is all surface: each way 6 voxels at 0 and 3 at one row = 2 mm,
    # so HD95 = 2 mm and ASSD = 12/18 mm (1 voxel and 1/3 on a 1 mm grid: spacing was used)
    assert val["a", "tumour"] == pytest.approx(
        {"dice": 2 / 3, "iou": 0.5, "hd95": 2.0, "assd": 2 / 3, "ref_voxels": 9, "pred_voxels": 9},
        rel=1e-6,
    )
    hd95_b, assd_b = surface_metrics(pred_b == 1, ref_b == 1, SPACING)
    want_b = {"dice": 0.8, "iou": 2 / 3, "hd95": hd95_b, "assd": assd_b}
    assert val["b", "liver"] == pytest.approx({**want_b, "ref_voxels": 48, "pred_voxels": 32})
    diagonal = math.sqrt((11 * 2.0) ** 2 + (9 * 1.0) ** 2 + (2 * 3.0) ** 2)
    assert val["b", "tumour"] == pytest.approx(
        {"dice": 0, "iou": 0, "hd95": diagonal, "assd": diagonal, "ref_voxels": 4, "pred_voxels": 0}
    )

    mean, std = summary["mean"], summary["std"]
    assert mean["tumour"]["dice"] == pytest.approx(1 / 3)  # the missed tumour counts as 0
    assert std["tumour"]["dice"] == pytest.approx(1 / 3)
    assert mean["tumour"]["hd95"] == pytest.approx((2.0 + diagonal) / 2)
    assert mean["liver"]["hd95"] == pytest.approx(hd95_b / 2)
    assert summary["foreground_mean"]["dice"] == pytest.approx((0.9 + 1 / 3) / 2)
    assert set(summary["foreground_mean"]) == {"dice", "iou", "hd95", "assd"}


def _write_png_study(tmp_path):
    ref1, pred1 = np.zeros((12, 10)), np.zeros((12, 10))
    ref1[2:6, 2:6] = 1  # label 1 offset by 2 rows: HD95 2, ASSD 1 (test_surface's square)
    pred1[4:8, 2:6] = 1  # label 3 absent from both
    ref2, pred2 = np.zeros((12, 10)), np.zeros((12, 10))
    ref2[5:7, 5:7] = pred2[5:7, 5:7] = 3  # label 3 exact
    pred2[0, 0] = 1  # label 1 false structure
    for case, ref, pred in (("p1", ref1, pred1), ("p2", ref2, pred2)):
        _png(tmp_path / "refs" / f"{case}.png", ref)
        _png(tmp_path / "preds" / f"{case}.png", pred)
    (tmp_path / "preds" / "notes.txt").write_text("not a label map")
    return tmp_path / "preds", tmp_path / "refs"


def test_evaluate_folders_png_infers_labels_and_applies_policy(tmp_path):
    pred_dir, ref_dir = _write_png_study(tmp_path)
    summary = evaluate_folders(pred_dir, ref_dir, tmp_path / "out")
    assert summary["labels"] == {"background": 0, "label_1": 1, "label_3": 3}
    got = {(r["case"], r["class"]): r for r in _read_csv(tmp_path / "out" / "per_case.csv")}
    assert len(got) == 4

    def pick(key):
        return tuple(float(got[key][k]) for k in ("dice", "hd95", "assd"))

    assert pick(("p1", "label_1")) == pytest.approx((0.5, 2.0, 1.0))  # both non-empty
    assert pick(("p1", "label_3")) == (1.0, 0.0, 0.0)  # both empty
    assert pick(("p2", "label_3")) == (1.0, 0.0, 0.0)
    # false structure: 2D diagonal of a 12x10 grid at 1 mm (PNG's singleton Z adds nothing)
    assert pick(("p2", "label_1")) == pytest.approx((0.0, math.hypot(11, 9), math.hypot(11, 9)))
    assert (got["p2", "label_1"]["ref_voxels"], got["p2", "label_1"]["pred_voxels"]) == ("0", "1")

    # label_1 means: dice (0.5 + 0)/2, iou (8/24 + 0)/2, hd95 (2 + d)/2, assd (1 + d)/2;
    # label_3 is perfect, so the foreground mean halves label_1's distances
    lines = format_summary(summary).splitlines()
    d = math.hypot(11, 9)
    assert lines[0] == "2 cases"
    row = next(line for line in lines if line.startswith("label_1"))
    assert row.split()[1:] == ["0.2500", "0.1667", f"{(2 + d) / 2:.2f}", f"{(1 + d) / 2:.2f}"]
    assert lines[-1].split() == ["foreground", "mean", "0.6250", "0.5833", "4.05", "3.80"]
    assert f"{(2 + d) / 4:.2f}" == "4.05" and f"{(1 + d) / 4:.2f}" == "3.80"


def test_output_exists_needs_force(tmp_path):
    pred_dir, ref_dir = _write_png_study(tmp_path)
    out = tmp_path / "out"
    evaluate_folders(pred_dir, ref_dir, out)
    before = (out / "summary.json").read_text()
    _png(pred_dir / "p1.png", np.zeros((12, 10)))  # label 1 now missed in p1
    with pytest.raises(OutputExistsError):
        evaluate_folders(pred_dir, ref_dir, out)
    assert (out / "summary.json").read_text() == before

    summary = evaluate_folders(pred_dir, ref_dir, out, force=True)
    assert summary["mean"]["label_1"]["dice"] == 0.0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert sorted(p.name for p in out.iterdir()) == ["per_case.csv", "summary.json"]


def test_missing_prediction_names_the_file(tmp_path):
    pred_dir, ref_dir = _write_png_study(tmp_path)
    (pred_dir / "p2.png").unlink()
    with pytest.raises(DataError, match="no prediction") as err:
        evaluate_folders(pred_dir, ref_dir, tmp_path / "out")
    assert err.value.path == pred_dir / "p2.png"
    assert not (tmp_path / "out").exists()


def test_prediction_without_reference_is_an_error(tmp_path):
    pred_dir, ref_dir = _write_png_study(tmp_path)
    _png(pred_dir / "p9.png", np.zeros((12, 10)))
    with pytest.raises(DataError, match="no reference") as err:
        evaluate_folders(pred_dir, ref_dir, tmp_path / "out")
    assert err.value.path == pred_dir / "p9.png"


def test_shape_mismatch_names_both_shapes_and_writes_nothing(tmp_path):
    pred_dir, ref_dir = _write_png_study(tmp_path)
    _png(pred_dir / "p2.png", np.zeros((12, 11)))
    with pytest.raises(DataError, match=r"\(12, 11, 1\).*\(12, 10, 1\)") as err:
        evaluate_folders(pred_dir, ref_dir, tmp_path / "out")
    assert err.value.path == pred_dir / "p2.png"
    assert not (tmp_path / "out").exists()


def test_unknown_label_value_in_prediction(tmp_path):
    pred_dir, ref_dir = _write_png_study(tmp_path)
    _png(pred_dir / "p1.png", np.full((12, 10), 5))
    with pytest.raises(DataError, match=r"\[5\] not in labels") as err:
        evaluate_folders(pred_dir, ref_dir, tmp_path / "out")
    assert err.value.path == pred_dir / "p1.png"


def test_missing_or_empty_folders(tmp_path):
    pred_dir, ref_dir = _write_png_study(tmp_path)
    with pytest.raises(DataError, match="reference folder not found"):
        evaluate_folders(pred_dir, tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no label files") as err:
        evaluate_folders(tmp_path / "empty", ref_dir, tmp_path / "out")
    assert err.value.path == tmp_path / "empty"


def test_explicit_and_msd_labels(tmp_path):
    pred_dir, ref_dir = _write_png_study(tmp_path)
    labels = {"spot": 3, "bg": 0, "dot": 1}
    summary = evaluate_folders(pred_dir, ref_dir, tmp_path / "o1", labels=labels)
    assert list(summary["mean"]) == ["dot", "spot"]  # value order, background not scored
    with pytest.raises(DataError, match=r"\[1\] not in labels"):  # a class left out of labels
        evaluate_folders(pred_dir, ref_dir, tmp_path / "o4", labels={"spot": 3})
    # Medical Segmentation Decathlon writes value -> name
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x", "3": "y"}}))
    summary = evaluate_folders(pred_dir, ref_dir, tmp_path / "o2")
    assert summary["labels"] == {"bg": 0, "x": 1, "y": 3}
    with pytest.raises(ValueError, match="no foreground"):
        evaluate_folders(pred_dir, ref_dir, tmp_path / "o3", labels={"bg": 0})


def test_evaluate_lesions_scores_objects_per_case_and_pooled(tmp_path, capsys):

    from medflow.cli import main

    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    a = np.zeros((12, 12, 4), dtype=np.uint8)
    a[1:3, 1:3, 1] = 1  # two lesions in case a
    a[8:10, 8:10, 2] = 1
    pa = a.copy()
    pa[8:10, 8:10, 2] = 0  # the second one missed ...
    pa[5, 10, 0] = 1  # ... and a false one
    b = np.zeros_like(a)  # case b: no lesion, none predicted
    for name, ref, pred in (("a", a, pa), ("b", b, b)):
        nib.save(nib.Nifti1Image(ref, np.eye(4)), str(ref_dir / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(pred, np.eye(4)), str(pred_dir / f"{name}.nii.gz"))
    labels = {"background": 0, "lesion": 1}
    summary = evaluate_folders(pred_dir, ref_dir, tmp_path / "ev", labels=labels, lesions=True)
    pooled = summary["lesion_detection"]["pooled"]["lesion"]
    assert (pooled["tp"], pooled["fn"], pooled["fp"]) == (1, 1, 1)
    assert pooled["f1"] == pytest.approx(0.5)
    per_case = {c["case"]: c["lesions"]["lesion"] for c in summary["per_case"]}
    assert per_case["b"]["f1"] == 1.0 and per_case["a"]["recall"] == pytest.approx(0.5)
    assert "lesion_detection" not in evaluate_folders(
        pred_dir, ref_dir, tmp_path / "plain", labels=labels
    )
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    argv = ["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--lesions"]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    assert "F1 0.500" in capsys.readouterr().out
