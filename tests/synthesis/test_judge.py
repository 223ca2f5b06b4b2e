"""The judge term (``AlignConfig.judge_weight``, :mod:`medflow.synthesis.judge`): a frozen
segmenter's cross-entropy on (image, mask) pairs, differentiable in the images, and the
alignment held to it."""

import json

import pytest
import torch
from conftest import TINY_SYNTH, TINY_TRAIN, make_nnunet_dataset, skull_strip

from medflow.data.datasets import load_slices
from medflow.data.layout import load_dataset
from medflow.errors import MedflowError
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.train import train
from medflow.synthesis.align import align
from medflow.synthesis.config import AlignConfig, SynthConfig
from medflow.synthesis.judge import SegmenterJudge
from medflow.synthesis.train import train_synth


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    ds = make_nnunet_dataset(tmp_path_factory.mktemp("src") / "ds", n_train=4, n_test=2)
    return skull_strip(ds)


@pytest.fixture(scope="module")
def judge_ckpt(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("judge")
    return train(
        source, out, TrainConfig(steps=300, lr=3e-3, **TINY_TRAIN), quiet=True
    ).final_checkpoint


def test_the_judge_prefers_the_true_masks_and_passes_gradients_to_the_images_only(
    source, judge_ckpt
):
    spec = load_dataset(source)
    judge = SegmenterJudge(judge_ckpt, spec.num_classes, torch.device("cpu"))
    slices = load_slices(spec.training, judge_prep(judge_ckpt), spec.num_classes)
    view = slices.images.clone().requires_grad_(True)
    fg = torch.ones(view.shape[0], 1, *view.shape[2:], dtype=torch.bool)
    right = judge(view, fg, slices.masks)
    wrong = judge(view.detach(), fg, slices.masks.roll(1, dims=0).flip(-1))
    assert float(right.detach()) < float(wrong)
    right.backward()
    assert view.grad is not None and view.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in judge.module.parameters())
    # a judge at another size reads the images resized to its own, and answers at theirs
    big = torch.nn.functional.interpolate(slices.images, scale_factor=2.0, mode="bilinear")
    assert judge.probs(big).shape[2:] == big.shape[2:]


def judge_prep(ckpt):
    from medflow.segmentation.predict import Predictor

    return Predictor(ckpt, "cpu").prep


def test_a_judge_of_other_classes_is_refused(judge_ckpt):
    with pytest.raises(MedflowError, match="segments 3 classes, the synthesis model 4"):
        SegmenterJudge(judge_ckpt, 4, torch.device("cpu"))


def test_the_judge_term_keeps_the_aligned_images_readable_as_their_masks(
    source, judge_ckpt, tmp_path
):
    stage1 = train_synth(
        source, tmp_path / "s1", SynthConfig(steps=60, lr=3e-3, **TINY_SYNTH), quiet=True
    )
    refs = tmp_path / "refs"
    refs.mkdir()
    for path in sorted((source / "imagesTs").glob("*.nii.gz")):
        (refs / path.name).write_bytes(path.read_bytes())
    cfg = dict(k=2, steps=30, batch_size=4, sampler_steps=2, lr=1e-3, reg_weight=0.0, threads=1)
    with pytest.raises(ValueError, match="judge_segmenter is the judge term's judge"):
        AlignConfig(judge_segmenter=str(judge_ckpt), **cfg)
    with pytest.raises(MedflowError, match="needs a judge"):
        align(stage1, refs, tmp_path / "none", AlignConfig(judge_weight=1.0, **cfg), quiet=True)
    assert not (tmp_path / "none").exists()
    records = {}
    for weight in (1e-6, 50.0):  # 1e-6: the judge measured, its term without effect
        out = tmp_path / f"judged_{weight}"
        judged = AlignConfig(judge_weight=weight, judge_segmenter=str(judge_ckpt), **cfg)
        align(stage1, refs, out, judged, quiet=True)
        records[weight] = json.loads((out / "align.json").read_text())
    assert records[1e-6]["judge_before"] == records[50.0]["judge_before"]
    # the reward alone makes the images harder to read as their masks; the term holds it
    assert records[50.0]["judge_after"] < records[1e-6]["judge_after"]
    header = (tmp_path / "judged_50.0" / "log.csv").read_text().splitlines()[0].split(",")
    assert "judge" in header
