"""benchmarks/gpu.py's CPU smoke path: the results file's structure, and numbers that agree
with each other (slices/s is batch over seconds per call, the ratio is flow over UNet time)."""

import json
import statistics
from pathlib import Path

import pytest
from conftest import benchmark_module

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    yield from benchmark_module("gpu.py", "gpu_benchmark")


@pytest.fixture(scope="module")
def smoke(gpu, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    assert gpu.main(["--cpu-smoke", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_smoke_run_names_its_machine_and_covers_every_model_setup_and_batch(gpu, smoke):
    assert smoke["device"] == "cpu" and smoke["gpu"] is None
    assert smoke["torch"] and smoke["machine"]["cores"] >= 1
    cfg = smoke["config"]
    assert cfg["size"] == 32 and cfg["batches"] == [1, 4]
    keys = [(r["model"], r["mode"], r["batch"]) for r in smoke["rows"]]
    expected = [(m, s.name, b) for s in gpu.MODES for m in cfg["models"] for b in cfg["batches"]]
    assert sorted(keys) == sorted(expected) and len(set(keys)) == len(keys)
    for row in smoke["rows"]:
        cuda_only = row["mode"] in ("cuda-graph", "compile-cudagraphs")
        if cuda_only:
            assert (row["status"], row["reason"]) == ("skipped", "needs CUDA")
        else:  # eager and compiled (dynamo's eager backend here) ran
            assert row["status"] == "ok", row
            assert row["parameters"] > 0
            assert row["method"].startswith(row["model"])  # the method's name, as stored


def test_throughput_is_batch_over_the_median_seconds_per_call(smoke):
    ok = [r for r in smoke["rows"] if r["status"] == "ok"]
    assert len(ok) == 2 * 2 * 2  # models x (eager, compile) x batches
    for row in ok:
        assert len(row["rounds_s"]) == smoke["config"]["rounds"]
        assert all(s > 0 for s in row["rounds_s"]) and row["setup_s"] > 0
        assert row["seconds_per_call"] == statistics.median(row["rounds_s"])
        assert row["slices_per_s"] == pytest.approx(row["batch"] / row["seconds_per_call"])
        assert row["slices_per_s"] > 0 and row["calls_per_round"] >= 3
        if row["batch"] == 1:
            assert row["latency_ms"] > 0
        else:
            assert row["latency_ms"] is None


def test_ratios_are_flow_over_unet_time_and_the_goal_is_not_judged_on_a_cpu(smoke):
    by = {(r["model"], r["mode"], r["batch"]): r for r in smoke["rows"] if r["status"] == "ok"}
    ratios = smoke["summary"]["ratios"]
    assert {(r["mode"], r["batch"]) for r in ratios} == {(m, b) for _, m, b in by}
    for r in ratios:
        flow, unet = by[("medflowseg", r["mode"], r["batch"])], by[("unet", r["mode"], r["batch"])]
        assert r["flow_over_unet_time"] == pytest.approx(
            flow["seconds_per_call"] / unet["seconds_per_call"]
        )
    goal = smoke["summary"]["goal"]
    best = max(
        (r for r in by.values() if r["model"] == "medflowseg"), key=lambda r: r["slices_per_s"]
    )
    assert goal["best"] == {k: best[k] for k in ("mode", "batch", "slices_per_s")}
    assert goal["slices_per_s"] == 2000 and goal["met"] is None


def test_a_spent_budget_skips_and_a_failing_setup_is_a_row(gpu, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--cpu-smoke", "--budget-s", "0", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["status"] for r in rows if r["mode"] in ("eager", "compile")} == {"skipped"}
    assert json.loads(out.read_text())["summary"]["goal"]["best"] is None

    real = gpu.measure

    def fail_at_batch_4(call, batch, cfg, device):
        if batch == 4:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(call, batch, cfg, device)

    monkeypatch.setattr(gpu, "measure", fail_at_batch_4)
    assert gpu.main(["--cpu-smoke", "--modes", "eager", "--out", str(out)]) == 0
    rows = {(r["model"], r["batch"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("unet", 1)]["status"] == "ok"
    assert rows[("unet", 4)]["status"] == "error"
    assert "out of memory (simulated)" in rows[("unet", 4)]["error"]
    assert "| unet | eager |" in capsys.readouterr().out
