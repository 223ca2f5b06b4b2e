"""`medflow bench` at test size: every method, both budgets, a well-formed result (no timing
is asserted: timings belong to the benchmark, not to the tests)."""

import json

import pytest
from conftest import TINY_TRAIN, make_nnunet_dataset

from medflow.cli import main
from medflow.errors import MedflowError, OutputExistsError
from medflow.segmentation.bench import BenchConfig, aggregate, run_bench

SETTINGS = {
    "unet": [("1 call", {})],
    "medflowseg": [("euler-1", {"steps": 1}), ("euler-2 x2", {"steps": 2, "samples": 2})],
    "diffusion": [("ddim-3", {"sampler": "ddim", "steps": 3})],
}


@pytest.fixture(scope="module")
def benched(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = make_nnunet_dataset(root / "ds", n_test=2)
    cfg = BenchConfig(
        datasets=(str(data),),
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


def test_config_names_a_bad_budget_or_a_method_without_settings():
    with pytest.raises(MedflowError, match="budget"):
        BenchConfig(budgets=("energy",))
    with pytest.raises(MedflowError, match="no sampling settings"):
        BenchConfig(methods=("unet", "gan"))


def test_cli_quick_mode_writes_the_table(tmp_path, capsys):
    data = make_nnunet_dataset(tmp_path / "ds", n_test=1)
    argv = ["bench", "--out", str(tmp_path / "b"), "--data", str(data), "--methods", "unet",
            "--steps", "2", "--threads", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| ds | steps | unet | 1 call | 2 |" in out
    assert main(argv) == 2  # results.json exists: --force needed
    assert "already exists" in capsys.readouterr().err
