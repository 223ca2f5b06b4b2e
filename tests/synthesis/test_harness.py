"""The AlignFlow harness at tiny size: every condition through the one runner, graded."""

import dataclasses
import json
import shutil

import pytest
from conftest import TINY_TRAIN, make_nnunet_dataset

from medflow.data.datasets import plan_preprocessing
from medflow.data.layout import load_dataset
from medflow.data.naming import is_synthetic
from medflow.errors import OutputExistsError
from medflow.synthesis.align import read_references
from medflow.synthesis.harness import (
    DEFAULT_BASELINES,
    ORACLE,
    HarnessConfig,
    _faithfulness,
    _synthetic_slices,
    conditions,
    run_alignflow,
)
from medflow.synthesis.model import SynthModel

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
        "sample_steps": 3,
        "threads": 1,
    },  # fmt: skip
    align={"steps": 1, "batch_size": 2, "sampler_steps": 2, "threads": 1},
    baselines=(*DEFAULT_BASELINES, "augmented_aligned"),
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


NAMES = [
    "source",
    "source+unaligned",
    "source+unaligned, 2 steps",
    "source+stage-1 on real masks",
    "source+augmented",
    "source hist-matched K=1",
    "source hist-matched K=2",
    "source+aligned K=1",
    "source+aligned K=2",
    "source+augmented+aligned K=1",
    "source+augmented+aligned K=2",
    ORACLE,
]


def test_every_condition_is_trained_scored_and_graded(harness):
    source, target, out, record = harness
    assert [r["condition"] for r in record["rows"]] == NAMES
    for r in record["rows"]:
        summary = json.loads((out / r["run"] / "eval_default" / "summary.json").read_text())
        assert r["foreground"] == summary["foreground_mean"]  # scored on the target's test set
        assert json.loads((out / r["run"] / "config.json").read_text())["config"]["steps"] == 2
    by = {e["condition"]: e for e in record["summary"]}
    assert by["source"]["dice_gain"] == 0.0
    gain = by["source+unaligned"]["dice"] - by["source"]["dice"]
    assert by["source+unaligned"]["dice_gain"] == pytest.approx(gain)
    assert by["source+unaligned"]["dice_gain_ci"] is None  # one replicate: no interval
    sets = [
        "unaligned",
        "unaligned, 2 steps",
        "stage-1 on real masks",
        "aligned K=1",
        "aligned K=2",
        "aligned K=1, augmented",
        "aligned K=2, augmented",
    ]
    assert list(record["faithfulness_dice"]) == sets
    assert set(record["faithfulness_dice"]["unaligned"]) == {"source_segmenter", "oracle_segmenter"}
    assert list(record["distances_to_target_test"]) == ["source real", *sets]
    assert list(record["mask_statistics"]) == ["source real", *sets]
    assert set(record["alignment"]) == {"1", "2"} and set(record["alignment"]["1"]) == {"0"}
    # every class's mean before and after alignment, per channel (class anchors off)
    means = record["alignment"]["1"]["0"]["class_means"]
    assert set(means) == {"before", "after"} and len(means["after"][0]) == 3
    compared = {(c["condition"], c["versus"]) for c in record["contrasts"]}
    assert ("source+aligned K=2", "source+unaligned, 2 steps") in compared
    assert ("source+aligned K=1", "source hist-matched K=1") in compared
    assert ("source+augmented+aligned K=1", "source+augmented") in compared
    assert ("source+augmented+aligned K=2", "source+aligned K=2") in compared
    assert "source+aligned K=2 − source+unaligned, 2 steps" in (out / "results.md").read_text()


def test_the_controls_differ_from_the_unaligned_set_as_intended(harness):
    source, target, out, record = harness
    meta = {
        name: json.loads((out / "datasets" / name / "dataset.json").read_text())
        for name in ("unaligned_seed0", "unaligned_2steps_seed0", "real_masks_seed0")
    }
    # the equal-steps control: the stage-1 model with the aligned model's sampler steps
    assert meta["unaligned_seed0"]["medflow"]["steps"] == TINY.synth["sample_steps"] == 3
    assert meta["unaligned_2steps_seed0"]["medflow"]["steps"] == TINY.align["sampler_steps"]
    assert not meta["unaligned_2steps_seed0"]["medflow"]["aligned"]
    # the real-mask control: images for source masks, not mask-flow samples
    assert meta["real_masks_seed0"]["medflow"]["masks"] == "given"
    # the baselines hold the source's cases (augmented: and a copy of each)
    n_source = load_dataset(source).training
    assert len(load_dataset(out / "datasets" / "augmented_seed0").training) == 2 * len(n_source)
    assert len(load_dataset(out / "datasets" / "histmatch_k1").training) == len(n_source)
    # augmented + aligned: the aligned arm's set, every case (synthetic ones too) twice
    aligned = [c.case_id for c in load_dataset(out / "datasets" / "aligned_k1_seed0").training]
    both = [
        c.case_id for c in load_dataset(out / "datasets" / "augmented_aligned_k1_seed0").training
    ]
    assert len(both) == 2 * len(aligned) and sum(map(is_synthetic, aligned)) >= 1
    assert sum(map(is_synthetic, both)) == 2 * sum(map(is_synthetic, aligned))


def test_baselines_are_selectable():
    cfg = HarnessConfig(ks=(1, 5), baselines=("histogram",), oracle=False)
    names = [c.name for c in conditions(cfg, stage1_steps=20)]
    assert names == [
        "source",
        "source+unaligned",
        "source hist-matched K=1",
        "source hist-matched K=5",
        "source+aligned K=1",
        "source+aligned K=5",
    ]
    # when stage 1 already samples with the aligned steps the control would be a duplicate
    steps = [c.name for c in conditions(HarnessConfig(align={"sampler_steps": 20}), 20)]
    assert "source+unaligned, 20 steps" not in steps
    with pytest.raises(ValueError, match="unknown baselines"):
        HarnessConfig(baselines=("mixup",))


def test_a_finished_harness_is_not_overwritten_and_reuse_reads_it_back(harness):
    source, target, out, record = harness
    with pytest.raises(OutputExistsError):
        run_alignflow(source, target, out, TINY, quiet=True)
    again = run_alignflow(source, target, out, TINY, quiet=True, force=True, reuse=True)
    assert again["rows"] == record["rows"] and again["summary"] == record["summary"]


def test_a_judge_needs_its_arm_and_a_term_to_serve():
    anchored = {"class_anchor_weight": 1.0}
    with pytest.raises(ValueError, match="judge must be one of"):
        HarnessConfig(judge="oracle", align=anchored)
    with pytest.raises(ValueError, match="needs that baseline"):
        HarnessConfig(judge="augmented", baselines=("histogram",), align=anchored)
    with pytest.raises(ValueError, match="class_anchor_weight > 0 or align.judge_weight"):
        HarnessConfig(judge="source")
    with pytest.raises(ValueError, match="needs a judge"):
        HarnessConfig(align={"judge_weight": 1.0})
    with pytest.raises(ValueError, match="unjudged control leaves out a judge"):
        HarnessConfig(baselines=("unjudged",))
    assert HarnessConfig(judge="augmented", align={"judge_weight": 1.0}).judge == "augmented"
    # the harness's own configs of the alignment carry the weight without the judge's path
    assert conditions(HarnessConfig(judge="source", align={"judge_weight": 1.0}), 20)


def test_the_judge_is_trained_before_the_alignments_use_it(harness, tmp_path):
    source, target, _, _ = harness
    cfg = dataclasses.replace(
        TINY,
        ks=(1,),
        baselines=("augmented",),
        oracle=False,
        judge="augmented",
        align={**TINY.align, "class_anchor_weight": 1.0, "judge_weight": 1.0},
    )
    out = tmp_path / "judged"
    record = run_alignflow(source, target, out, cfg, quiet=True)
    judge = next(r for r in record["rows"] if r["condition"] == "source+augmented")
    aligned = json.loads((out / "synth" / "align_k1_seed0" / "align.json").read_text())
    # the augmented arm's segmenter of the same replicate labels the references and judges
    assert aligned["config"]["anchor_segmenter"] == str(out / judge["checkpoint"])
    assert aligned["config"]["judge_segmenter"] == str(out / judge["checkpoint"])
    assert aligned["class_means"]["estimate"] == "labels"
    assert record["alignment"]["1"]["0"]["judge_after"] == aligned["judge_after"]
    # the aligned set keeps its replicate's name (a later seed must not reuse it)
    assert sorted(p.name for p in (out / "datasets").iterdir()) == [
        "aligned_k1_seed0",
        "augmented_seed0",
        "unaligned_seed0",
    ]
    assert record["config"]["judge"] == "augmented"


def test_the_unjudged_control_aligns_the_same_way_without_the_judge(harness, tmp_path):
    source, target, _, _ = harness
    cfg = dataclasses.replace(
        TINY,
        ks=(1,),
        baselines=("augmented", "augmented_aligned", "unjudged"),
        oracle=False,
        judge="augmented",
        align={**TINY.align, "judge_weight": 1.0},
    )
    names = [c.name for c in conditions(cfg, stage1_steps=3)]
    assert names[-2:] == [
        "source+aligned without judge K=1",
        "source+augmented+aligned without judge K=1",
    ]
    out = tmp_path / "unjudged"
    record = run_alignflow(source, target, out, cfg, quiet=True)
    judged = json.loads((out / "synth" / "align_k1_seed0" / "align.json").read_text())
    bare = json.loads((out / "synth" / "align_nojudge_k1_seed0" / "align.json").read_text())
    # only the judge differs: same K, seed, reward and steps; no segmenter, weight 0
    assert judged["config"]["judge_weight"] == 1.0 and judged["config"]["judge_segmenter"]
    assert bare["config"]["judge_weight"] == 0.0 and bare["config"]["judge_segmenter"] is None
    differ = {k for k in judged["config"] if judged["config"][k] != bare["config"][k]}
    assert differ == {"judge_weight", "judge_segmenter"}
    assert "judge_after" in judged and "judge_after" not in bare
    recorded = record["alignment"]["aligned without judge K=1"]["0"]
    assert recorded["reward_after"] == bare["reward_after"]
    # each arm trains on its own set, and the contrasts isolate the judge
    sets = {r["condition"]: r["run"] for r in record["rows"]}
    assert len(set(sets.values())) == len(sets) == len(names)
    assert (out / "datasets" / "augmented_aligned_nojudge_k1_seed0" / "dataset.json").exists()
    pairs = {(c["condition"], c["versus"]) for c in record["contrasts"]}
    assert ("source+aligned K=1", "source+aligned without judge K=1") in pairs
    assert (
        "source+augmented+aligned K=1",
        "source+augmented+aligned without judge K=1",
    ) in pairs
    assert "aligned without judge K=1" in record["faithfulness_dice"]


def test_every_replicate_has_its_own_stage1_and_references(harness, tmp_path):
    source, target, out0, _ = harness
    cfg = dataclasses.replace(
        TINY,
        ks=(1,),
        seeds=(0, 1),
        baselines=(),
        oracle=False,
        stage1_per_seed=True,
        draw_references=True,
    )
    out = tmp_path / "per_seed"
    record = run_alignflow(source, target, out, cfg, quiet=True)
    runs = {seed: out / "synth" / f"stage1_seed{seed}" for seed in (0, 1)}
    for seed, run in runs.items():
        assert json.loads((run / "config.json").read_text())["config"]["seed"] == seed
        # each replicate's alignment starts from its own stage 1
        aligned = json.loads(
            (out / "synth" / f"align_k1_seed{seed}_refs{seed}" / "align.json").read_text()
        )
        assert aligned["checkpoint"] == str((run / "synth.pt").resolve())
        # ... and the references its seed draws
        prep = SynthModel.load(run / "synth.pt").prep
        drawn = read_references(target / "references", prep, 1, order_seed=seed)
        assert aligned["config"]["reference_seed"] == seed
        assert aligned["references"] == drawn.files
    assert record["synth_model"] == {str(s): str(r / "synth.pt") for s, r in runs.items()}
    assert (runs[0] / "synth.pt").read_bytes() != (runs[1] / "synth.pt").read_bytes()
    # every replicate's sets are graded, each by its own replicate's source segmenter
    by_seed = record["faithfulness_by_seed"]
    assert set(by_seed) == {"0", "1"} and by_seed["0"] == record["faithfulness_dice"]
    assert list(by_seed["1"]) == ["unaligned", "aligned K=1"]
    spec = load_dataset(source)
    prep = plan_preprocessing(spec, spec.training, (TINY_TRAIN["size"],) * 2, None)
    seg = next(r for r in record["rows"] if r["condition"] == "source" and r["seed"] == 1)
    aligned = _synthetic_slices(out / "datasets" / "aligned_k1_seed1_refs1", prep, spec.num_classes)
    dice = _faithfulness(out / seg["checkpoint"], aligned, spec.num_classes, "cpu")
    assert by_seed["1"]["aligned K=1"]["source_segmenter"] == pytest.approx(dice)
    # reuse reads the stage-1 runs back rather than training them again
    stamp = {s: (r / "synth.pt").stat().st_mtime_ns for s, r in runs.items()}
    run_alignflow(source, target, out, cfg, quiet=True, force=True, reuse=True)
    assert {s: (r / "synth.pt").stat().st_mtime_ns for s, r in runs.items()} == stamp
    # given checkpoints: one for all replicates, or one per seed, never another count
    given = run_alignflow(
        source, target, tmp_path / "given", cfg, synth_model=[runs[1] / "synth.pt"] * 2
    )
    assert set(given["synth_model"].values()) == {str(runs[1] / "synth.pt")}
    with pytest.raises(ValueError, match="3 stage-1 checkpoints for 2 replicate seeds"):
        run_alignflow(source, target, tmp_path / "bad", cfg, synth_model=[out0] * 3)
    with pytest.raises(ValueError, match="synth.seed is not used"):
        dataclasses.replace(cfg, synth={**TINY.synth, "seed": 3})
    with pytest.raises(ValueError, match="align.reference_seed is not used"):
        dataclasses.replace(cfg, align={**TINY.align, "reference_seed": 3})
