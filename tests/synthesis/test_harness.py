"""The AlignFlow harness at tiny size: every condition through the one runner, graded."""

import json
import shutil

import pytest
from conftest import TINY_TRAIN, make_nnunet_dataset

from medflow.errors import OutputExistsError
from medflow.synthesis.harness import ORACLE, HarnessConfig, run_alignflow

TINY = HarnessConfig(
    ks=(1, 2),
    seeds=(0,),
    n_synthetic=4,
    segmenter={**TINY_TRAIN, "steps": 2, "val_fraction": 0, "threads": 1},
    synth={
        "size": 16,
        "mask_channels": (8, 16),
        "image_channels": (8, 16),
        "batch_size": 4,
        "steps": 3,
        "warmup_steps": 1,
        "sample_steps": 2,
        "threads": 1,
    },  # fmt: skip
    align={"steps": 1, "batch_size": 2, "sampler_steps": 2, "threads": 1},
)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    source = make_nnunet_dataset(root / "source", n_train=3, n_test=1)
    target = make_nnunet_dataset(root / "target", n_train=2, n_test=2)
    refs = target / "references"
    refs.mkdir()
    for path in sorted((target / "imagesTs").glob("*.nii.gz")):
        shutil.copy(path, refs / path.name)
    return (
        source,
        target,
        root / "out",
        run_alignflow(source, target, root / "out", TINY, quiet=True),
    )


def test_every_condition_is_trained_scored_and_graded(harness):
    source, target, out, record = harness
    names = ["source", "source+unaligned", "source+aligned K=1", "source+aligned K=2", ORACLE]
    assert [r["condition"] for r in record["rows"]] == names
    for r in record["rows"]:
        summary = json.loads((out / r["run"] / "eval_default" / "summary.json").read_text())
        assert r["foreground"] == summary["foreground_mean"]  # scored on the target's test set
        assert json.loads((out / r["run"] / "config.json").read_text())["config"]["steps"] == 2
    by = {e["condition"]: e for e in record["summary"]}
    assert by["source"]["dice_gain"] == 0.0
    gain = by["source+unaligned"]["dice"] - by["source"]["dice"]
    assert by["source+unaligned"]["dice_gain"] == pytest.approx(gain)
    sets = ["unaligned", "aligned K=1", "aligned K=2"]
    assert list(record["faithfulness_dice"]) == sets
    assert set(record["faithfulness_dice"]["unaligned"]) == {"source_segmenter", "oracle_segmenter"}
    assert list(record["distances_to_target_test"]) == ["source real", *sets]
    assert list(record["mask_statistics"]) == ["source real", *sets]
    assert set(record["alignment"]) == {"1", "2"}


def test_a_finished_harness_is_not_overwritten_and_reuse_reads_it_back(harness):
    source, target, out, record = harness
    with pytest.raises(OutputExistsError):
        run_alignflow(source, target, out, TINY, quiet=True)
    again = run_alignflow(source, target, out, TINY, quiet=True, force=True, reuse=True)
    assert again["rows"] == record["rows"] and again["summary"] == record["summary"]
