"""`medflow bench` at test size: every method, both budgets, the ablations, the first-seed
rule for slow settings, a well-formed result (no timing is asserted: timings belong to the
benchmark, not to the tests)."""

import dataclasses
import json

import pytest
from conftest import TINY_TRAIN, make_nnunet_dataset

from medflow.cli import main
from medflow.errors import MedflowError, OutputExistsError
from medflow.segmentation.bench import (
    ABLATIONS,
    FULL_SETTINGS,
    METHODS,
    QUICK_SETTINGS,
    BenchConfig,
    aggregate,
    markdown_table,
    method_style,
    run_bench,
)
from medflow.segmentation.bench.config import VARIANTS

SETTINGS = {
    "unet": [("1 call", {})],
    "medflowseg": [
        ("euler-1", {"sampler": "euler", "steps": 1}),
        ("euler-2 x2", {"sampler": "euler", "steps": 2, "samples": 2}),
    ],
    "diffusion": [("ddim-3", {"sampler": "ddim", "steps": 3})],
}


@pytest.fixture(scope="module")
def benched(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = make_nnunet_dataset(root / "ds", n_test=2)
    cfg = BenchConfig(
        datasets=(str(data),),
        methods=tuple(SETTINGS),
        budgets=("steps", "time"),
        steps=3,
        seeds=(0,),
        settings=SETTINGS,
        train=TINY_TRAIN,
        probe_steps=3,
        latency_slices=2,
    )
    record = run_bench(cfg, root / "out", device="cpu", quiet=True)
    return root, cfg, record


def test_every_method_setting_and_budget_is_measured_and_scored(benched):
    root, cfg, record = benched
    rows = record["rows"]
    assert {(r["budget"], r["method"], r["setting"]) for r in rows} == {
        (b, m, label) for b in ("steps", "time") for m in SETTINGS for label, _ in SETTINGS[m]
    }
    calls = {"1 call": 1, "euler-1": 1, "euler-2 x2": 4, "ddim-3": 3}
    for r in rows:
        assert r["evaluations_per_image"] == calls[r["setting"]]
        assert r["gflops_per_image"] > 0 and r["parameters"] > 0
        assert r["latency_ms_per_image"] > 0 and r["throughput_images_per_s"] > 0
        assert r["peak_memory_mib"] > 10  # a process holding torch is well above 10 MiB
        assert 0.0 <= r["foreground"]["dice"] <= 1.0
        assert set(r["per_class"]) == {"a", "b"}
        assert r["train_steps"] >= 1
        assert (root / "out" / r["run"] / "checkpoint_final.pt").is_file()
    # the steps budget trains every method the same number of steps
    assert {r["train_steps"] for r in rows if r["budget"] == "steps"} == {3}
    # more network calls cost more counted FLOPs, on the same network
    flow = {r["setting"]: r["gflops_per_image"] for r in rows if r["method"] == "medflowseg"}
    assert flow["euler-2 x2"] > 3 * flow["euler-1"]


def test_files_written_and_json_matches_the_table(benched):
    root, _, record = benched
    out = root / "out"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(record["rows"]))
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + len(aggregate(record["rows"]))
    for name in ("dice_vs_cost.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timed = [r for r in on_disk["rows"] if r["budget"] == "time"]
    assert all(r["budget_seconds"] > 0 and r["seconds_per_step_probe"] > 0 for r in timed)
    # the time budget is what MedFlowSeg needs for the steps budget's steps
    flow = next(r for r in timed if r["method"] == "medflowseg")
    assert flow["train_steps"] == 3


def test_bench_refuses_to_overwrite_results(benched):
    root, cfg, _ = benched
    with pytest.raises(OutputExistsError):
        run_bench(cfg, root / "out", device="cpu", quiet=True)


def test_reuse_reads_back_finished_runs_instead_of_training(benched, monkeypatch):
    import medflow.segmentation.protocol as protocol

    root, cfg, record = benched

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(protocol, "train", no_training)
    # part of the earlier bench: one budget, two methods
    part = dataclasses.replace(cfg, budgets=("steps",), methods=("unet", "medflowseg"))
    again = run_bench(part, root / "out", device="cpu", quiet=True, reuse=True, force=True)
    dice = {
        (r["method"], r["setting"]): r["foreground"]
        for r in record["rows"]
        if r["budget"] == "steps"
    }
    assert {(r["method"], r["setting"]) for r in again["rows"]} == {
        k for k in dice if k[0] in part.methods
    }
    assert all(r["foreground"] == dice[(r["method"], r["setting"])] for r in again["rows"])


def test_config_names_a_bad_budget_or_a_method_without_settings():
    with pytest.raises(MedflowError, match="budget"):
        BenchConfig(budgets=("energy",))
    with pytest.raises(MedflowError, match="method must be among.*'gan'"):
        BenchConfig(methods=("unet", "gan"))
    with pytest.raises(MedflowError, match="no sampling settings"):
        BenchConfig(methods=("unet", "medflowseg-no-faa"), settings={"unet": [("1 call", {})]})
    with pytest.raises(MedflowError, match="first_seed_only_above"):
        BenchConfig(first_seed_only_above=0)


def test_full_mode_runs_every_method_and_the_quick_mode_can_select_the_ablations():
    full = BenchConfig.full()
    # every method but the module variants, which run when named
    assert set(full.methods) == set(METHODS) - set(VARIANTS) and len(full.seeds) == 3
    # the step and ensemble ablations are MedFlowSeg's own settings; the module ablations
    # have one-step and four-step settings in full mode, one-step in quick mode
    assert {label for label, _ in FULL_SETTINGS["medflowseg"]} >= {
        "euler-1", "euler-2", "euler-4", "euler-8", "euler-1 x5"
    }  # fmt: skip
    for a in ABLATIONS:
        assert METHODS[a]["model"] == "medflowseg"
        assert [label for label, _ in FULL_SETTINGS[a]] == ["euler-1", "euler-4"]
        assert [label for label, _ in QUICK_SETTINGS[a]] == ["euler-1"]
    assert BenchConfig.quick().methods == ("unet", "medflowseg", "diffusion")
    assert dataclasses.replace(BenchConfig.quick(), methods=ABLATIONS).methods == ABLATIONS
    # DDPM-1000 is above the first-seed-only threshold, every other setting below it
    calls = {
        label: f.get("steps", 1) * f.get("samples", 1)
        for settings in FULL_SETTINGS.values()
        for label, f in settings
    }
    assert [k for k, v in calls.items() if v > full.first_seed_only_above] == ["ddpm-1000"]


def test_settings_can_be_left_out_by_label():
    full = BenchConfig.full().without_settings(["ddpm-1000", "euler-8"])
    labels = {m: [label for label, _ in full.settings[m]] for m in full.methods}
    assert labels["diffusion"] == ["ddim-10", "ddim-50", "ddim-10 x5"]
    assert "euler-8" not in labels["medflowseg"] and "euler-4" in labels["medflowseg"]
    assert labels["unet"] == ["1 call"]
    assert any(label == "ddpm-1000" for label, _ in BenchConfig.full().settings["diffusion"])
    # ddpm-1000 is no setting of the quick mode's methods; the UNet has only one setting
    with pytest.raises(MedflowError, match="ddpm-1000: not a sampling setting"):
        BenchConfig.quick().without_settings(["ddpm-1000"])
    with pytest.raises(MedflowError, match="leaves unet with no setting"):
        BenchConfig.quick().without_settings(["1 call"])


def test_cli_quick_mode_writes_the_table(tmp_path, capsys):
    data = make_nnunet_dataset(tmp_path / "ds", n_test=1)
    argv = ["bench", "--out", str(tmp_path / "b"), "--data", str(data), "--methods", "unet",
            "--steps", "2", "--threads", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| ds | steps | unet | 1 call | 2 |" in out
    assert main(argv) == 2  # results.json exists: --force needed
    assert "already exists" in capsys.readouterr().err


ABLATION_SETTINGS = {
    "medflowseg": [("euler-1", {"steps": 1}), ("euler-3", {"sampler": "euler", "steps": 3})],
    **{a: [("euler-1", {"steps": 1})] for a in ABLATIONS},
}


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    """MedFlowSeg and its three ablations, two seeds; euler-3 (3 calls) counts as slow."""
    root = tmp_path_factory.mktemp("ablations")
    data = make_nnunet_dataset(root / "ds", n_test=1)
    cfg = BenchConfig(
        datasets=(str(data),),
        methods=("medflowseg", *ABLATIONS),
        steps=2,
        seeds=(0, 1),
        settings=ABLATION_SETTINGS,
        train=TINY_TRAIN,
        latency_slices=2,
        first_seed_only_above=2,
    )
    return root / "out", cfg, run_bench(cfg, root / "out", device="cpu", quiet=True)


def test_ablations_train_the_network_their_name_says(ablated):
    out, _, record = ablated
    rows = [r for r in record["rows"] if r["setting"] == "euler-1"]
    assert {(r["method"], r["seed"]) for r in rows} == {
        (m, s) for m in ("medflowseg", *ABLATIONS) for s in (0, 1)
    }
    params = {}
    for r in rows:
        want = {"dbsa": True, "faa": True, **METHODS[r["method"]]}
        assert {k: r["network"][k] for k in want} == want
        # what the run itself recorded, not only what the bench meant to ask for
        ran = json.loads((out / r["run"] / "config.json").read_text())["config"]
        assert (ran["model"], ran["dbsa"], ran["faa"]) == (want["model"], want["dbsa"], want["faa"])
        params[r["method"]] = r["parameters"]
    assert params["medflowseg-no-faa"] < params["medflowseg"]
    assert params["medflowseg-no-dbsa"] < params["medflowseg"]
    assert params["medflowseg-no-both"] < min(
        params["medflowseg-no-faa"], params["medflowseg-no-dbsa"]
    )
    # each method is a row of its own in the table, and a colour and marker of its own in the plot
    table = markdown_table(record["rows"])
    for m in ABLATIONS:
        assert f"| {m} | euler-1 | 2 | 2 |" in table
    styles = {m: tuple(method_style(m).values()) for m in METHODS}
    assert len(set(styles.values())) == len(METHODS)
    assert (out / "dice_vs_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slow_settings_are_evaluated_on_the_first_seed_only(ablated):
    out, cfg, record = ablated
    slow = [r for r in record["rows"] if r["setting"] == "euler-3"]
    fast = [r for r in record["rows"] if r["method"] == "medflowseg" and r["setting"] == "euler-1"]
    assert [r["seed"] for r in slow] == [0] and [r["seed"] for r in fast] == [0, 1]
    (s,) = slow
    assert s["slow"] and s["evaluations_per_image"] == 3 and s["seeds_evaluated"] == 1
    assert s["latency_slices"] == 1 and s["throughput_slices"] == cfg.latency_slices
    assert all(not r["slow"] and r["seeds_evaluated"] == 2 for r in fast)
    assert fast[0]["throughput_slices"] == 5  # the whole test split: one case of 5 slices
    # the second seed trained (euler-1 was scored on it) but never predicted euler-3
    assert (out / "runs" / "ds_steps_medflowseg_seed1" / "pred_euler-1").is_dir()
    assert not (out / "runs" / "ds_steps_medflowseg_seed1" / "pred_euler-3").exists()
    (a,) = [a for a in aggregate(record["rows"]) if a["setting"] == "euler-3"]
    assert (a["seeds"], a["seeds_trained"]) == (1, 2)
    table = (out / "results.md").read_text()
    assert "| medflowseg | euler-3 | 2 | 1 of 2* |" in table
    assert "evaluated on the first seed only" in table


def test_results_json_is_well_formed(ablated):
    out, cfg, record = ablated
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["config"] == json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert on_disk["config"]["first_seed_only_above"] == 2
    assert on_disk["rows"] == json.loads(json.dumps(record["rows"]))
    assert {"cpu", "cores", "torch", "threads", "device"} <= set(on_disk["machine"])
    for r in on_disk["rows"]:
        assert 0.0 <= r["foreground"]["dice"] <= 1.0 and r["gflops_per_image"] > 0
        assert r["latency_ms_per_image"] > 0 and r["throughput_images_per_s"] > 0


def test_cli_selects_an_ablation_in_quick_mode(tmp_path, capsys):
    data = make_nnunet_dataset(tmp_path / "ds", n_test=1)
    argv = ["bench", "--out", str(tmp_path / "b"), "--data", str(data), "--methods",
            "medflowseg-no-faa", "--steps", "2", "--threads", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "| ds | steps | medflowseg-no-faa | euler-1 | 2 | 1 |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert [(r["network"]["faa"], r["network"]["dbsa"]) for r in rows] == [(False, True)]
    assert main([*argv[:5], "--methods", "medflowseg-no-gan", "--force"]) == 2
    assert "medflowseg-no-gan" in capsys.readouterr().err


def test_probe_times_neither_the_first_steps_nor_the_validating_last(tmp_path, monkeypatch):
    from medflow.segmentation.bench import run as bench

    asked = {}

    def fake_train(data, out, cfg, *, device, force, quiet):
        asked.update(steps=cfg.steps, device=device, model=cfg.model, faa=cfg.faa)
        out.mkdir(parents=True)
        # steps 1-2 warm up (slow), 3-5 take 1 s each, step 6 validates (100 s)
        seconds = [5.0, 6.0, 7.0, 8.0, 9.0, 109.0]
        lines = ["step,seconds", *(f"{i + 1},{s}" for i, s in enumerate(seconds))]
        (out / "log.csv").write_text("\n".join(lines) + "\n")
        return type("Result", (), {"run_dir": out})()

    monkeypatch.setattr(bench, "train", fake_train)
    cfg = BenchConfig(probe_steps=3, train=TINY_TRAIN)
    per_step = bench._seconds_per_step("medflowseg-no-faa", cfg, tmp_path, tmp_path, "cpu")
    assert per_step == pytest.approx(1.0)
    assert asked == {"steps": 6, "device": "cpu", "model": "medflowseg", "faa": False}


def test_cli_skips_a_setting_and_names_an_unknown_one(tmp_path, capsys):
    data = make_nnunet_dataset(tmp_path / "ds", n_test=1)
    argv = ["bench", "--out", str(tmp_path / "b"), "--data", str(data), "--methods",
            "medflowseg", "--steps", "2", "--threads", "1", "--quiet"]  # fmt: skip
    assert main([*argv, "--skip-settings", "euler-4"]) == 0
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["euler-1"]
    assert main([*argv, "--force", "--skip-settings", "euler-9"]) == 2
    err = capsys.readouterr().err
    assert "euler-9: not a sampling setting" in err and len(err.strip().splitlines()) == 1


def test_the_plateau_budget_trains_each_method_until_it_stalls(tmp_path):
    data = make_nnunet_dataset(tmp_path / "ds", n_test=1)
    settings = {"unet": SETTINGS["unet"], "medflowseg": SETTINGS["medflowseg"][:1]}
    # a rise above 1.0 is impossible: each run stops at its third validation, long before
    # the cap, whatever it learns
    train = {**TINY_TRAIN, "val_every": 2, "warmup_steps": 1, "plateau_delta": 1.0}
    cfg = BenchConfig(
        datasets=(str(data),),
        methods=tuple(settings),
        budgets=("plateau",),
        seeds=(0,),
        settings=settings,
        train=train,
        latency_slices=2,
        plateau_cap=50,
        plateau_patience=2,
        plateau_reductions=0,
    )
    rows = run_bench(cfg, tmp_path / "out", device="cpu", quiet=True)["rows"]
    assert {r["method"] for r in rows} == {"unet", "medflowseg"}
    for r in rows:
        assert r["train_steps"] == 6 and r["plateaued"] and r["plateau_cap"] == 50
        assert [step for step, _ in r["curve"]] == [2, 4, 6]
        assert all(0.0 <= dice <= 1.0 for _, dice in r["curve"])
    with pytest.raises(MedflowError, match="plateau_cap and plateau_patience must be >= 1"):
        BenchConfig(plateau_patience=0)
