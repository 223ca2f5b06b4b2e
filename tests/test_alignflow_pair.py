"""benchmarks/alignflow_pair.py: operands name a results file and one of its conditions; a
missing condition or file is refused with the file named; the table pairs by seed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import benchmark_module

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "alignflow_pair.py"


def _results(path: Path, rows: dict[str, list[float]]) -> Path:
    record = {
        "rows": [
            {"condition": c, "seed": s, "foreground": {"dice": d, "iou": d - 0.1}}
            for c, values in rows.items()
            for s, d in enumerate(values)
        ]
    }
    path.write_text(json.dumps(record))
    return path


@pytest.fixture(scope="module")
def pair():
    yield from benchmark_module("alignflow_pair.py", "alignflow_pair")


def test_operand_splits_at_the_json_suffix(pair):
    assert pair.operand("runs/a.json:source+aligned K=5") == (
        Path("runs/a.json"),
        "source+aligned K=5",
    )
    # a colon inside the condition is the condition's
    assert pair.operand("a.json:x: y")[1] == "x: y"
    with pytest.raises(Exception, match="FILE.json:CONDITION"):
        pair.operand("a.json")


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_script_pairs_two_files_by_seed(tmp_path):
    a = _results(tmp_path / "a.json", {"source": [0.5, 0.6, 0.7], "arm": [0.52, 0.63, 0.74]})
    b = _results(tmp_path / "b.json", {"source": [0.5, 0.6, 0.7], "arm": [0.51, 0.61, 0.71]})
    out = tmp_path / "pairs.json"
    res = _run("--out", str(out), "--pair", "new − old", f"{a}:arm", f"{b}:arm")
    assert res.returncode == 0, res.stderr
    (entry,) = json.loads(out.read_text())["pairs"]
    assert entry["dice_values"] == pytest.approx([1.0, 2.0, 3.0])
    assert entry["shared_max_diff"] == pytest.approx(0.0)
    assert "| new − old | +2.0 [" in out.with_suffix(".md").read_text()


def test_script_names_the_file_of_a_missing_condition(tmp_path):
    a = _results(tmp_path / "a.json", {"source": [0.5, 0.6]})
    out = tmp_path / "pairs.json"
    res = _run("--out", str(out), "--pair", "x", f"{a}:nope", f"{a}:source")
    assert res.returncode == 2 and "a.json: no condition 'nope'" in res.stderr
    assert not out.exists()
