import csv
import dataclasses
import json
import time

import pytest
import torch
from conftest import TINY_TRAIN, make_nnunet_dataset

import medflow.segmentation.train as train_module
from medflow.engine.checkpoint import load_checkpoint
from medflow.errors import MedflowError, OutputExistsError
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.train import lr_factor, train

TINY = TINY_TRAIN


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="size must be a multiple of 8"):
        TrainConfig(size=20)
    with pytest.raises(ValueError, match="model must be one of"):
        TrainConfig(model="segformer")
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, cfg.warmup_steps, cfg.steps) == pytest.approx(0.1)
    assert lr_factor(9, cfg.warmup_steps, cfg.steps) == pytest.approx(1.0)
    assert lr_factor(55, cfg.warmup_steps, cfg.steps) == pytest.approx(0.5, abs=0.02)
    assert lr_factor(100, cfg.warmup_steps, cfg.steps) == pytest.approx(0.0, abs=1e-9)


def test_training_writes_a_complete_run_folder(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_dataset, out, TrainConfig(steps=4, **TINY), quiet=True)
    for name in (
        "config.json",
        "log.csv",
        "curves.png",
        "checkpoint_last.pt",
        "checkpoint_best.pt",
        "checkpoint_final.pt",
    ):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "log.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert rows[1]["val_dice"] != "" and rows[0]["val_dice"] == ""
    assert {"val_dice_a", "val_dice_b"} <= set(rows[0])
    best = load_checkpoint(out / "checkpoint_best.pt")
    assert best["step"] == result.best_step
    assert best["best_val"] == pytest.approx(
        max(float(r["val_dice"]) for r in rows if r["val_dice"])
    )
    assert best["config"]["size"] == 16 and tuple(best["net"]["channels"]) == (8, 16)
    final = load_checkpoint(out / "checkpoint_final.pt")
    last = load_checkpoint(out / "checkpoint_last.pt")
    assert final["step"] == last["step"] == 4 and "optimizer" not in final
    assert all(torch.equal(t, last["ema"][n]) for n, t in final["model"].items())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_slices"] + cfg["val_slices"] == 4 * 5


def test_refuses_to_overwrite_a_run_without_force(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(tiny_dataset, out, TrainConfig(steps=1, **TINY), quiet=True)
    with pytest.raises(OutputExistsError):
        train(tiny_dataset, out, TrainConfig(steps=1, **TINY), quiet=True)
    train(tiny_dataset, out, TrainConfig(steps=1, **TINY), quiet=True, force=True)


def test_same_seed_same_weights(tiny_dataset, tmp_path):
    cfg = TrainConfig(steps=3, **TINY)
    a = load_checkpoint(
        train(tiny_dataset, tmp_path / "a", cfg, quiet=True).run_dir / "checkpoint_last.pt"
    )
    b = load_checkpoint(
        train(tiny_dataset, tmp_path / "b", cfg, quiet=True).run_dir / "checkpoint_last.pt"
    )
    c = load_checkpoint(
        train(
            tiny_dataset, tmp_path / "c", TrainConfig(steps=3, **{**TINY, "seed": 1}), quiet=True
        ).run_dir
        / "checkpoint_last.pt"
    )
    assert all(torch.equal(t, b["model"][n]) for n, t in a["model"].items())
    assert not all(torch.equal(t, c["model"][n]) for n, t in a["model"].items())


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_dataset, tmp_path, monkeypatch):
    cfg = TrainConfig(steps=4, **TINY)
    train(tiny_dataset, tmp_path / "full", cfg, quiet=True)

    import medflow.segmentation.train as train_module

    real_update, calls = train_module.ema_update, []

    def crash_on_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the step-2 checkpoint, before the step-4 one
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    monkeypatch.setattr(train_module, "ema_update", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_dataset, tmp_path / "crash", cfg, quiet=True)
    monkeypatch.setattr(train_module, "ema_update", real_update)
    assert load_checkpoint(tmp_path / "crash" / "checkpoint_last.pt")["step"] == 2
    train(tiny_dataset, tmp_path / "crash", cfg, quiet=True, resume=True)

    full = load_checkpoint(tmp_path / "full" / "checkpoint_last.pt")
    resumed = load_checkpoint(tmp_path / "crash" / "checkpoint_last.pt")
    assert resumed["step"] == 4
    for key in ("model", "ema"):
        for name, tensor in full[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)
    rows = list(csv.DictReader((tmp_path / "crash" / "log.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]


def test_resume_without_checkpoint_is_a_clear_error(tiny_dataset, tmp_path):
    with pytest.raises(MedflowError, match="nothing to resume"):
        train(tiny_dataset, tmp_path / "none", TrainConfig(steps=1, **TINY), resume=True)


def test_unet_baseline_trains(tiny_dataset, tmp_path):
    result = train(
        tiny_dataset, tmp_path / "u", TrainConfig(model="unet", steps=2, **TINY), quiet=True
    )
    assert load_checkpoint(result.best_checkpoint)["net"]["flow"] is False


def test_single_volume_is_split_by_slab(tmp_path):
    data = make_nnunet_dataset(tmp_path / "ds", n_train=1, n_test=1, shape=(16, 16, 20))
    out = tmp_path / "run"
    train(data, out, TrainConfig(steps=1, val_fraction=0.2, **TINY), quiet=True)
    info = json.loads((out / "config.json").read_text())
    # 20 slices: a 4-slice validation slab and 2 dropped slices on each side of it
    assert info["val_slices"] == 4 and info["train_slices"] == 20 - 4 - 2 * 2


def test_naive_velocity_flow_is_available_for_comparison(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="seg_weight must be 0"):
        TrainConfig(parameterization="velocity")
    naive = dict(
        parameterization="velocity", seg_weight=0.0, time_schedule="uniform", time_zero_fraction=0.0
    )
    result = train(tiny_dataset, tmp_path / "n", TrainConfig(steps=2, **naive, **TINY), quiet=True)
    from medflow.segmentation.predict import Predictor

    method = Predictor(result.final_checkpoint, device="cpu").method
    assert method.cfg.parameterization == "velocity"
    rows = list(csv.DictReader((tmp_path / "n" / "log.csv").read_text().splitlines()))
    assert all(float(r["seg_loss"]) == 0.0 for r in rows)


def test_a_run_stored_before_shortcut_jumps_existed_resumes_without_them(tiny_dataset, tmp_path):
    from medflow.engine.checkpoint import save_checkpoint

    run = tmp_path / "old"
    cfg = TrainConfig(**{**TINY, "steps": 4, "checkpoint_every": 2, "shortcut_fraction": 0.0})
    with pytest.raises(KeyboardInterrupt):
        _stop_after(2, lambda: train(tiny_dataset, run, cfg, quiet=True))
    # what a checkpoint written before the fields existed holds
    state = load_checkpoint(run / "checkpoint_last.pt")
    for key in ("shortcut_fraction", "shortcut_max_steps", "dropout"):
        state["config"].pop(key)
    for key in ("step_input", "dropout"):
        state["net"].pop(key)
    save_checkpoint(run / "checkpoint_last.pt", state)
    assert TrainConfig.from_dict(state["config"]).shortcut_fraction == 0.0
    result = train(tiny_dataset, run, TrainConfig(**TINY), resume=True, quiet=True)
    final = load_checkpoint(result.final_checkpoint)
    assert final["step"] == 4 and final["net"]["step_input"] is False


def _stop_after(steps: int, run):
    """Run ``run()`` with training interrupted after ``steps`` optimiser steps."""
    import medflow.segmentation.train as train_module

    real = train_module.ema_update

    def update(*args, **kwargs):
        if args[3] >= steps:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "ema_update", update)
        run()


def test_a_time_budget_fixes_the_steps_that_fit_it_and_records_them(tiny_dataset, tmp_path):
    import json

    from medflow.engine.logs import read_log

    with pytest.raises(ValueError, match="time_budget"):
        TrainConfig(time_budget="soon")
    assert TrainConfig(time_budget="1.5h").budget_seconds == 5400.0
    assert TrainConfig(time_budget="90").budget_seconds == 90.0
    cfg = TrainConfig(**{**TINY, "steps": 10**6, "time_budget": "4s", "warmup_steps": 8})
    result = train(tiny_dataset, tmp_path / "run", cfg, quiet=True)
    log = read_log(result.run_dir / "log.csv")
    assert 6 < result.steps < 10**6 and len(log) == result.steps
    # the budget is kept, give or take the time of the steps being estimated
    assert log[-1]["seconds"] < 4.0 * 2
    ckpt = load_checkpoint(result.final_checkpoint)
    assert ckpt["config"]["steps"] == result.steps and ckpt["config"]["time_budget"] == "4s"
    stored = json.loads((result.run_dir / "config.json").read_text())["config"]
    assert stored["steps"] == result.steps
    # the schedule ends at zero at the resolved last step
    assert log[-1]["lr"] == pytest.approx(0.0, abs=1e-6)


def test_a_time_budget_spaces_validation_to_a_tenth_of_it(tiny_dataset, tmp_path):
    from medflow.engine.logs import read_log

    slow = 0.3  # every validation pass costs this much more than the tiny set's own
    real = train_module._Run._val_probs

    def val_probs(self):
        time.sleep(slow)
        return real(self)

    cfg = TrainConfig(**{**TINY, "steps": 10**6, "time_budget": "6s", "warmup_steps": 8})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module._Run, "_val_probs", val_probs)
        result = train(tiny_dataset, tmp_path / "run", cfg, quiet=True)
    every = load_checkpoint(result.final_checkpoint)["config"]["val_every"]
    assert every > TINY["val_every"]
    log = read_log(result.run_dir / "log.csv")
    after = [r["step"] for r in log if r["val_dice"] == r["val_dice"] and r["step"] > 6]
    # validations after the fit fall on multiples of the new spacing (and the last step)
    assert all(s % every == 0 or s == result.steps for s in after)
    # and together take about a tenth of the budget, not the half they would every 2 steps
    assert slow * len(after) <= 0.1 * 6.0 * 1.5 + slow


def test_a_cpu_clock_budget_ignores_time_the_process_does_not_run(tiny_dataset, tmp_path):
    from medflow.engine.logs import read_log

    nap = 0.05  # per step, asleep: wall time passes, this process's CPU time does not
    real = train_module._Run.step

    def step(self, i):
        time.sleep(nap)
        return real(self, i)

    cfg = TrainConfig(**{**TINY, "steps": 10**6, "time_budget": "1s", "budget_clock": "cpu"})
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module._Run, "step", step)
        result = train(tiny_dataset, tmp_path / "run", cfg, quiet=True)
    wall = time.perf_counter() - t0
    log = read_log(result.run_dir / "log.csv")
    # the log counts CPU seconds, about the budget (the last step and the final checkpoint
    # overshoot it: 2.01 s once on a loaded 2-core CI machine), while the naps went by on
    # the wall
    assert log[-1]["seconds"] < 3.0
    assert wall > log[-1]["seconds"] + 0.8 * nap * result.steps
    with pytest.raises(ValueError, match="budget_clock must be wall or cpu"):
        TrainConfig(budget_clock="gpu")


def test_a_plateau_stops_the_run_and_the_stored_config_retrains_it(tiny_dataset, tmp_path):
    from medflow.engine.logs import read_log

    # no rise can exceed 1.0: the second validation is the first without progress
    fields = {**TINY, "steps": 100, "warmup_steps": 1, "val_every": 2}
    cfg = TrainConfig(**fields, lr_schedule="constant", plateau_patience=1, plateau_delta=1.0)
    result = train(tiny_dataset, tmp_path / "run", cfg, quiet=True)
    assert result.steps == 4 and len(read_log(result.run_dir / "log.csv")) == 4
    stored = TrainConfig.from_dict(load_checkpoint(result.final_checkpoint)["config"])
    assert stored.steps == 4 and stored.plateau_patience == 1
    info = json.loads((result.run_dir / "config.json").read_text())
    assert info["config"]["steps"] == 4
    # the learning rate stayed at its peak: stopping changed nothing already trained
    assert all(r["lr"] == pytest.approx(cfg.lr) for r in read_log(result.run_dir / "log.csv"))
    # patience 2 waits one validation more
    longer = train(
        tiny_dataset,
        tmp_path / "run2",
        dataclasses.replace(cfg, plateau_patience=2),
        quiet=True,
    )
    assert longer.steps == 6
    with pytest.raises(ValueError, match="plateau_patience needs lr_schedule constant"):
        TrainConfig(plateau_patience=3)
    assert lr_factor(50, 10, 100, "constant") == 1.0 < 2 * lr_factor(50, 10, 100)


def test_a_plateau_schedule_halves_the_rate_at_each_stall_and_stops_after_its_reductions(
    tiny_dataset, tmp_path
):
    from medflow.engine.logs import read_log

    # every validation after the first is a stall: steps 4 and 6 halve the rate, 8 stops
    fields = {**TINY, "steps": 100, "warmup_steps": 1, "val_every": 2, "plateau_delta": 1.0}
    cfg = TrainConfig(**fields, lr_schedule="plateau", plateau_patience=1, plateau_reductions=2)
    result = train(tiny_dataset, tmp_path / "run", cfg, quiet=True)
    assert result.steps == 8
    # "lr" is the rate the next step takes; a stall at step s reduces step s + 1's
    lrs = [r["lr"] for r in read_log(result.run_dir / "log.csv")]
    want = [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25]
    assert lrs == pytest.approx([cfg.lr * f for f in want])
    stored = load_checkpoint(result.run_dir / "checkpoint_last.pt")
    assert stored["plateau"]["reductions"] == 2 and stored["plateau"]["since"] == 1
    with pytest.raises(ValueError, match="lr_schedule plateau needs plateau_patience > 0"):
        TrainConfig(lr_schedule="plateau")
    with pytest.raises(ValueError, match="plateau_factor must be in"):
        TrainConfig(plateau_factor=1.0)
