import json

from conftest import make_nnunet_dataset

from medflow.cli import main
from medflow.data.plan import read_plan


def test_plan_writes_plans_json_and_prints_the_table(tmp_path, capsys):
    data = make_nnunet_dataset(tmp_path / "ds")  # 24 x 20 x 5 at 1 x 1.2 x 2.5 mm
    out = tmp_path / "run" / "plans.json"
    out.parent.mkdir()
    assert main(["plan", str(data), "--out", str(out), "--memory-gib", "2"]) == 0
    printed = capsys.readouterr().out
    plan = read_plan(out)
    assert json.loads(out.read_text())["format"] == "medflow-plan-v1"
    # 2.5 / 1.0 is not anisotropic by the 3x rule: the coarsest axis, Z
    assert plan.slice_axis == 2 and plan.target_spacing == (1.0, 1.2)
    assert plan.memory_gib == 2.0 and plan.estimated_memory_gib <= 2.0
    assert plan.patch_size == (24, 20) and plan.levels == 3  # 20 / 4 = 5 px bottleneck
    lines = printed.splitlines()
    assert lines[0] == "plan for ds"
    table = {line.split()[0]: line.split(None, 1)[1] for line in lines[3:19] if line.strip()}
    assert table["patch_size"] == "(24, 20)" and table["normalisation"] == "(zscore)"
    assert table["batch_size"] == str(plan.batch_size)
    assert "reasons:" in lines
    for reason in plan.reasons:
        assert f"  {reason}" in lines
    assert lines[-1] == f"wrote {out}"


def test_plan_refuses_to_overwrite_without_force(tmp_path, capsys):
    data = make_nnunet_dataset(tmp_path / "ds")
    out = tmp_path / "plans.json"
    out.write_text("{}")
    assert main(["plan", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"medflow plan: error: {out}: already exists and holds results; pass --force to overwrite\n"
    )
    assert out.read_text() == "{}"
    assert main(["plan", str(data), "--out", str(out), "--force", "--set", "levels=2"]) == 0
    assert read_plan(out).levels == 2


def test_bad_set_is_one_line_exit_2(tmp_path, capsys):
    data = make_nnunet_dataset(tmp_path / "ds")
    out = tmp_path / "plans.json"
    cases = [
        (
            ["--set", "levels=x"],
            "bad plan option: --set: plan field 'levels': 'x' is not an integer",
        ),
        (["--set", "patchsize=8,8"], "unknown plan field 'patchsize'"),
        (["--set", "levels"], "--set 'levels': expected FIELD=VALUE"),
        (["--set", "patch_size=13,13"], "plan field 'patch_size': 13 x 13 is not a multiple of 2"),
        (["--memory-gib", "0"], "--memory-gib: plan field 'memory_gib': 0 must be above 0"),
        (
            ["--memory-gib", "0.00001"],
            "plan field 'memory_gib': 1e-05 GiB cannot hold a batch of 2 patches of 2 x 2 px",
        ),
    ]
    for flags, message in cases:
        assert main(["plan", str(data), "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("medflow plan: error: ")
        assert message in err
        assert not out.exists()
    assert main(["plan", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: dataset folder not found" in capsys.readouterr().err
