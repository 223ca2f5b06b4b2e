"""The one runner: every arm trained, predicted and scored the same way, resumable."""

import json

import pytest
from conftest import TINY_TRAIN, make_nnunet_dataset

import medflow.segmentation.protocol as protocol
from medflow.segmentation.inference import SamplingOptions
from medflow.segmentation.protocol import Arm, Setting, run_protocol

FIELDS = {**TINY_TRAIN, "steps": 2, "threads": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_nnunet_dataset(tmp_path_factory.mktemp("protocol") / "ds", n_test=1)


def _arms(data, **extra):
    two = (Setting("one step"), Setting("euler-2", SamplingOptions(sampler="euler", steps=2)))
    return [
        Arm("unet", data, {**FIELDS, "model": "unet"}, tags={"method": "unet"}),
        Arm("flow", data, {**FIELDS, **extra}, two, tags={"method": "medflowseg"}),
    ]


def test_rows_are_the_runs_own_scores_and_carry_the_same_fields(data, tmp_path):
    rows = run_protocol(_arms(data), [0], tmp_path)
    assert [(r["arm"], r["setting"]) for r in rows] == [
        ("unet", "default"),
        ("flow", "one step"),
        ("flow", "euler-2"),
    ]
    assert len({frozenset(r) for r in rows}) == 1  # one schema
    for r in rows:
        tag = "one_step" if r["setting"] == "one step" else r["setting"]
        summary = json.loads((tmp_path / r["run"] / f"eval_{tag}" / "summary.json").read_text())
        assert r["foreground"] == summary["foreground_mean"]
        assert r["train_steps"] == 2 and r["seeds_evaluated"] == 1
        assert (tmp_path / r["checkpoint"]).is_file()
    flow = {r["setting"]: r["options"] for r in rows if r["arm"] == "flow"}
    assert (flow["one step"]["sampler"], flow["one step"]["steps"]) == ("euler", 1)
    assert (flow["euler-2"]["sampler"], flow["euler-2"]["steps"]) == ("euler", 2)


def test_reuse_reads_back_a_finished_run_and_retrains_a_changed_one(data, tmp_path, monkeypatch):
    first = run_protocol(_arms(data), [0], tmp_path)
    real, trained = protocol.train, []

    def counting(data, out, cfg, **kw):
        trained.append(out.name)
        return real(data, out, cfg, **kw)

    monkeypatch.setattr(protocol, "train", counting)
    assert run_protocol(_arms(data), [0], tmp_path, reuse=True) == first
    assert trained == []
    # a run recorded before a field existed is still the same run when the field's default
    # reproduces it (here: the budget clock and the refine start)
    path = tmp_path / "runs" / "flow_seed0" / "result.json"
    record = json.loads(path.read_text())
    del record["key"]["config"]["budget_clock"]
    for _, options in record["key"]["settings"]:
        del options["refine_start"]
    path.write_text(json.dumps(record))
    assert run_protocol(_arms(data), [0], tmp_path, reuse=True) == first
    assert trained == []
    run_protocol(_arms(data, lr=1e-3), [0], tmp_path, reuse=True)
    assert trained == ["flow_seed0"]  # only the arm whose config changed


def test_reuse_survives_moving_a_folder_that_holds_its_own_datasets(tmp_path, monkeypatch):
    import shutil

    first_out = tmp_path / "first"
    data = make_nnunet_dataset(first_out / "data" / "ds", n_test=1)
    arm = Arm("flow", data, FIELDS)
    first = run_protocol([arm], [0], first_out)
    moved = tmp_path / "moved"
    shutil.copytree(first_out, moved)
    shutil.rmtree(first_out)
    real, trained = protocol.train, []

    def counting(data, out, cfg, **kw):
        trained.append(out.name)
        return real(data, out, cfg, **kw)

    monkeypatch.setattr(protocol, "train", counting)
    arm = Arm("flow", moved / "data" / "ds", FIELDS)
    again = run_protocol([arm], [0], moved, reuse=True)
    assert trained == [] and again == first
    # a key written with absolute paths inside the folder (older runs) is read the same way
    path = moved / "runs" / "flow_seed0" / "result.json"
    record = json.loads(path.read_text())
    assert record["key"]["data"] == "out/data/ds"
    record["key"]["data"] = record["key"]["test"] = str(moved / "data" / "ds")
    path.write_text(json.dumps(record))
    assert run_protocol([arm], [0], moved, reuse=True) == first and trained == []
    # another dataset is another run
    other = make_nnunet_dataset(moved / "data" / "other", n_test=1)
    run_protocol([Arm("flow", other, FIELDS)], [0], moved, reuse=True)
    assert trained == ["flow_seed0"]


def test_a_slow_setting_runs_on_the_first_seed_only_and_train_only_arms_give_checkpoints(
    data, tmp_path
):
    def measure(predictor, arm, setting):
        return {"slow": setting.label == "euler-2"}

    arm = Arm("flow", data, FIELDS, _arms(data)[1].settings, measure=measure)
    rows = run_protocol([arm, Arm("plain", data, FIELDS, settings=())], [0, 1], tmp_path)
    flow = [(r["seed"], r["setting"], r["seeds_evaluated"]) for r in rows if r["arm"] == "flow"]
    assert flow == [(0, "one step", 2), (0, "euler-2", 1), (1, "one step", 2)]
    plain = [r for r in rows if r["arm"] == "plain"]
    assert [r["seed"] for r in plain] == [0, 1] and all("setting" not in r for r in plain)
    assert all((tmp_path / r["checkpoint"]).is_file() for r in plain)


def test_arm_names_must_be_distinct_folders(data, tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run_protocol([Arm("a b", data), Arm("a_b", data)], [0], tmp_path)


def test_ensemble_rows_score_the_members_checkpoints_per_seed(data, tmp_path):
    from medflow.data.io import read_image
    from medflow.segmentation.ensemble import Ensemble

    rows = run_protocol(_arms(data), [0, 1], tmp_path)
    # seed 1 of the flow is missing: only seed 0 has both members
    rows = [r for r in rows if not (r["arm"] == "flow" and r["seed"] == 1)]
    got = protocol.ensemble_rows(rows, ["flow", "unet"], "flow+unet", data, tmp_path)
    assert [(r["arm"], r["seed"], r["members"]) for r in got] == [
        ("flow+unet", 0, ["flow", "unet"])
    ]
    row = got[0]
    summary = json.loads((tmp_path / "ensembles/flow_unet_seed0/eval/summary.json").read_text())
    assert row["foreground"] == summary["foreground_mean"]
    assert row["train_steps"] == 4  # both members' steps
    flow_ckpt = next(r["checkpoint"] for r in rows if r["arm"] == "flow" and r["seed"] == 0)
    unet_ckpt = next(r["checkpoint"] for r in rows if r["arm"] == "unet" and r["seed"] == 0)
    image = read_image(sorted((data / "imagesTs").iterdir())[:1])
    want = Ensemble([tmp_path / flow_ckpt, tmp_path / unet_ckpt], "cpu").predict_volume(image)
    written = read_image(sorted((tmp_path / "ensembles/flow_unet_seed0/pred").iterdir())[:1])
    assert (written.array[0] == want).all()
