"""A planned run: the plan from the training data, patches at the planned spacing, a
sliding window back at native resolution."""

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_TRAIN, make_nnunet_dataset

from medflow.cli import main
from medflow.data.plan import read_plan, write_plan
from medflow.data.transforms import Preprocessing
from medflow.engine.checkpoint import load_checkpoint
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.predict import Predictor, predict_folder
from medflow.segmentation.train import train

# anisotropic in-plane (0.5 x 1 mm): a plan keeps the aspect, the fixed resize squashes it
SHAPE, SPACING = (40, 20, 4), (0.5, 1.0, 3.0)
PLANNED = {**TINY_TRAIN, "plan": "auto", "steps": 3, "val_every": 3}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("planned")
    data = make_nnunet_dataset(root / "ds", shape=SHAPE, spacing=SPACING, n_test=1)
    return data, train(data, root / "run", TrainConfig(**PLANNED), quiet=True)


def test_the_run_records_its_plan_and_trains_with_it(planned):
    data, result = planned
    plan = read_plan(result.run_dir / "plans.json")
    ckpt = load_checkpoint(result.final_checkpoint)
    assert ckpt["plan"] == plan.to_dict()
    cfg = TrainConfig.from_dict(ckpt["config"])
    assert cfg.plan == "auto" and cfg.patch == tuple(plan.patch_size)
    assert cfg.batch_size == plan.batch_size and cfg.slice_axis == plan.slice_axis == 2
    # depth from the plan, widths from the config: 8, doubling, at most 16
    assert cfg.channels == tuple(min(8 * 2**i, 16) for i in range(plan.levels))
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    assert prep.spacing == tuple(plan.target_spacing) and prep.size == cfg.patch
    # a slice of the training set keeps its millimetres: 40 x 20 px at 0.5 x 1 mm
    want = tuple(round(n * s / t) for n, s, t in zip(SHAPE[:2], SPACING[:2], plan.target_spacing))
    assert prep.slice_shape(SHAPE[:2], SPACING) == want


def test_prediction_slides_over_native_slices_and_returns_the_input_grid(planned, tmp_path):
    data, result = planned
    predictor = Predictor(result.final_checkpoint, device="cpu")
    predict_folder(result.final_checkpoint, data / "imagesTs", tmp_path / "p", quiet=True)
    out = nib.load(str(tmp_path / "p" / "case04.nii.gz"))
    img = nib.load(str(data / "imagesTs" / "case04_0000.nii.gz"))
    assert out.shape == SHAPE and np.allclose(out.affine, img.affine)
    # a volume larger than any training case: still its own grid, through the window
    big = make_nnunet_dataset(tmp_path / "big", shape=(72, 36, 3), spacing=SPACING, n_train=0)
    predict_folder(result.final_checkpoint, big / "imagesTs", tmp_path / "q", quiet=True)
    assert nib.load(str(tmp_path / "q" / "case00.nii.gz")).shape == (72, 36, 3)
    assert predictor.prep.spacing is not None


def test_a_plan_file_is_used_as_written_and_a_bad_one_is_one_line(planned, tmp_path, capsys):
    data, result = planned
    plan = read_plan(result.run_dir / "plans.json")
    path = write_plan(tmp_path / "plans.json", plan)
    flags = ["--size", "16", "--channels", "8,16", "--threads", "1", "--steps", "1", "--quiet"]
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "r"), *flags]
    assert main([*argv, "--plan", str(path)]) == 0
    assert read_plan(tmp_path / "r" / "plans.json") == plan
    (tmp_path / "bad.json").write_text("{}")
    assert main([*argv, "--force", "--plan", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json" in err[0] and "not a medflow plan" in err[0]


def test_without_a_plan_nothing_changes(tiny_dataset, tmp_path, capsys):
    result = train(tiny_dataset, tmp_path / "run", TrainConfig(**TINY_TRAIN, steps=1))
    # the run says which plan it used, here none
    assert "plan: none (every slice resized to 16 x 16, batch 4;" in capsys.readouterr().out
    ckpt = load_checkpoint(result.final_checkpoint)
    assert ckpt["plan"] is None and not (result.run_dir / "plans.json").exists()
    assert Preprocessing.from_dict(ckpt["preprocessing"]).spacing is None


def test_a_bad_time_budget_is_one_line(tiny_dataset, tmp_path, capsys):
    argv = ["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "r"), "--quiet"]
    assert main([*argv, "--time-budget", "soon"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "medflow train: error: bad training option: time_budget must be a positive duration "
        "like 15m, 90s or 1.5h (got --time-budget soon)"
    ]
    assert not (tmp_path / "r").exists()


def test_epochs_are_passes_over_the_training_slices(tiny_dataset, tmp_path, capsys):
    import json

    cfg = TrainConfig(**{**TINY_TRAIN, "epochs": 2, "val_every": 100})
    result = train(tiny_dataset, tmp_path / "run", cfg, quiet=True)
    info = json.loads((result.run_dir / "config.json").read_text())
    slices = info["train_slices"]
    assert result.steps == info["config"]["steps"] == -(-2 * slices // 4) != cfg.steps
    stored = TrainConfig.from_dict(load_checkpoint(result.final_checkpoint)["config"])
    assert stored.steps == result.steps and stored.epochs == 2
    argv = ["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "r"), "--quiet"]
    assert main([*argv, "--epochs", "3", "--time-budget", "1m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give epochs or time_budget, not both" in err[0]


def test_a_2_5d_model_sees_its_neighbours_end_to_end(tmp_path, capsys):
    data = make_nnunet_dataset(tmp_path / "ds", channels=2, n_test=1)
    cfg = TrainConfig(**{**TINY_TRAIN, "steps": 2, "context_slices": 1})
    result = train(data, tmp_path / "run", cfg, quiet=True)
    predictor = Predictor(result.final_checkpoint, device="cpu")
    # two channels at three slices each, stored with the preprocessing the checkpoint keeps
    assert predictor.prep.context == 1 and predictor.net.cfg.in_channels == 6
    predict_folder(result.final_checkpoint, data / "imagesTs", tmp_path / "p", quiet=True)
    out = nib.load(str(tmp_path / "p" / "case04.nii.gz"))
    img = nib.load(str(data / "imagesTs" / "case04_0000.nii.gz"))
    assert out.shape == img.shape and np.allclose(out.affine, img.affine)
    # 2D images refuse it in one line, before anything is written
    plan = {**TINY_TRAIN, "steps": 1, "plan": "auto"}
    pngs = make_nnunet_dataset(tmp_path / "png", ending=".png", shape=(24, 20, 1))
    argv = ["train", "--data", str(pngs), "--out", str(tmp_path / "r"), "--context-slices", "1"]
    assert main([*argv, "--size", "16", "--channels", "8,16", "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case00_0000.png" in err[0] and "context_slices=1" in err[0]
    assert not (tmp_path / "r").exists()
    # a plan's context_slices reaches the run it is given to
    from medflow.data.fingerprint import fingerprint_dataset
    from medflow.data.layout import load_dataset
    from medflow.data.plan import plan_from_fingerprint

    fp = fingerprint_dataset(load_dataset(data))
    path = write_plan(
        tmp_path / "plans.json", plan_from_fingerprint(fp, overrides={"context_slices": 2})
    )
    run = train(data, tmp_path / "auto", TrainConfig(**{**plan, "plan": str(path)}), quiet=True)
    assert Predictor(run.final_checkpoint, device="cpu").net.cfg.in_channels == 10


def test_the_cli_plans_trains_predicts_and_evaluates_a_tiny_3d_set(tmp_path, capsys):
    import json

    data = make_nnunet_dataset(tmp_path / "ds", shape=SHAPE, spacing=SPACING, n_test=1)
    plans, run, pred, ev = (tmp_path / n for n in ("plans.json", "run", "pred", "eval"))
    assert main(["plan", str(data), "--out", str(plans), "--set", "batch_size=3"]) == 0
    printed = capsys.readouterr().out
    assert "batch_size: 3: set by override" in printed and "compute" in printed
    flags = ["--channels", "8,16", "--threads", "1", "--steps", "2", "--val-every", "2"]
    assert main(["train", "--data", str(data), "--out", str(run), "--plan", str(plans), *flags,
                 "--quiet"]) == 0  # fmt: skip
    ckpt = load_checkpoint(run / "checkpoint_final.pt")
    assert ckpt["config"]["batch_size"] == 3 and ckpt["plan"] == read_plan(plans).to_dict()
    model = str(run / "checkpoint_final.pt")
    assert main(["predict", "--model", model, "--input", str(data / "imagesTs"), "--out",
                 str(pred), "--quiet"]) == 0  # fmt: skip
    out = nib.load(str(pred / "case04.nii.gz"))
    ref = nib.load(str(data / "labelsTs" / "case04.nii.gz"))
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
    assert main(["evaluate", "--pred", str(pred), "--ref", str(data / "labelsTs"), "--out",
                 str(ev)]) == 0  # fmt: skip
    summary = json.loads((ev / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["dice"] <= 1.0 and "case04" in json.dumps(summary)
