"""Class anchors (``AlignConfig.class_anchor_weight``): the target's class means estimated from
unlabelled references, and the alignment held to them."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_SYNTH, TINY_TRAIN, make_nnunet_dataset, skull_strip

from medflow.cli import main
from medflow.errors import DataError
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.train import train
from medflow.synthesis.align import align, read_references, segmenter_labels
from medflow.synthesis.anchors import ClassAnchors, class_means, estimate_anchors
from medflow.synthesis.config import AlignConfig, SynthConfig
from medflow.synthesis.model import SynthModel
from medflow.synthesis.train import train_synth


def test_em_with_the_shares_fixed_recovers_overlapping_class_means():
    # grey and white matter overlap as on a low-contrast site: a free mixture splits them
    # at the histogram's middle; with the shares known the means come out
    gen = torch.Generator().manual_seed(0)
    true = torch.tensor([-2.0, 0.05, 0.5])
    shares = torch.tensor([0.1, 0.6, 0.3])
    counts = (shares * 20000).long()
    values = torch.cat(
        [
            m + s * torch.randn(int(n), generator=gen)
            for m, s, n in zip(true, [0.3, 0.3, 0.3], counts)
        ]
    )
    got = estimate_anchors(values, shares, init=torch.tensor([-1.5, -0.5, 1.0]))
    assert torch.allclose(got, true, atol=0.05)
    # a class of no weight keeps its starting mean
    none = estimate_anchors(values, torch.tensor([0.1, 0.9, 0.0]), torch.tensor([-1.5, 0.0, 9.0]))
    assert none[2] == 9.0


def test_class_means_pool_the_tissue_pixels_of_each_class_and_pass_gradients():
    view = torch.tensor(
        [[[[1.0, 2.0], [3.0, 4.0]]], [[[5.0, 6.0], [7.0, 8.0]]]], requires_grad=True
    )
    masks = torch.tensor([[[0, 1], [1, 2]], [[1, 1], [2, 2]]])
    fg = torch.tensor([[[[False, True], [True, True]]], [[[True, True], [True, False]]]])
    means, shares = class_means(view, fg, masks, 3)
    # class 0 has no tissue pixel; class 1: 2, 3, 5, 6; class 2: 4, 7 (8 is background)
    assert means.tolist() == [[0.0, 4.0, 5.5]]
    assert torch.allclose(shares, torch.tensor([0.0, 4 / 6, 2 / 6]))
    means[0, 2].backward()
    assert view.grad[0, 0, 1, 1] == 0.5 and view.grad[1, 0, 1, 1] == 0.0


def test_the_anchor_term_is_zero_at_the_anchors_and_grows_away_from_them():
    gen = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 3, (4, 8, 8), generator=gen)
    levels = torch.tensor([-1.0, 0.0, 1.0])
    view = levels[masks][:, None] + 0.01 * torch.randn(4, 1, 8, 8, generator=gen)
    fg = torch.ones(4, 1, 8, 8, dtype=torch.bool)
    # references with the same classes at lower contrast
    ref = 0.5 * levels[masks][:, None] + 0.01 * torch.randn(4, 1, 8, 8, generator=gen)
    term = ClassAnchors.from_mixture([ref[:, 0][fg[:, 0]]], view, fg, masks, 3)
    assert torch.allclose(term.anchors[0], 0.5 * levels, atol=0.02)
    assert float(term(ref, fg, masks)) < 1e-3
    assert float(term(view, fg, masks)) > 0.1


def test_anchors_from_labels_are_the_references_class_means_under_those_labels():
    gen = torch.Generator().manual_seed(2)
    masks = torch.randint(0, 3, (4, 8, 8), generator=gen)
    view = torch.tensor([-1.0, 0.0, 1.0])[masks][:, None]
    fg = torch.ones(4, 1, 8, 8, dtype=torch.bool)
    # references at lower contrast, labelled without class 2
    ref = 0.5 * view + 0.01 * torch.randn(4, 1, 8, 8, generator=gen)
    labels = masks.clamp(max=1)
    term = ClassAnchors.from_labels((ref, fg, labels), view, fg, masks, 3)
    tissue = fg[:, 0]
    for c in (0, 1):
        assert torch.isclose(term.anchors[0, c], ref[:, 0][tissue & (labels == c)].mean())
    # a class the labels never give keeps stage 1's mean
    assert term.anchors[0, 2] == 1.0
    assert term.record()["estimate"] == "labels"
    with pytest.raises(ValueError, match="channel"):
        ClassAnchors.from_labels((ref.repeat(1, 2, 1, 1), fg, labels), view, fg, masks, 3)


def test_an_anchor_segmenter_needs_the_anchor_term():
    with pytest.raises(ValueError, match="class_anchor_weight"):
        AlignConfig(anchor_segmenter="seg.pt")
    assert AlignConfig(anchor_segmenter="seg.pt", class_anchor_weight=1.0).anchor_segmenter


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    ds = make_nnunet_dataset(tmp_path_factory.mktemp("src") / "ds", n_train=4, n_test=2)
    return skull_strip(ds)


@pytest.fixture(scope="module")
def stage1(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1")
    return train_synth(source, out, SynthConfig(steps=60, lr=3e-3, **TINY_SYNTH), quiet=True)


@pytest.fixture(scope="module")
def refs(source, tmp_path_factory):
    """A target whose classes lie closer together: a power curve on the head."""
    folder = tmp_path_factory.mktemp("refs")
    for i, path in enumerate(sorted((source / "imagesTs").glob("*.nii.gz"))):
        img = nib.load(path)
        data = img.get_fdata().astype(np.float32)
        head = data > 0
        data[head] = data[head].max() * (data[head] / data[head].max()) ** 0.3
        nib.save(nib.Nifti1Image(data, img.affine), str(folder / f"r{i}_0000.nii.gz"))
    return folder


CFG = dict(k=2, steps=30, batch_size=4, sampler_steps=2, lr=5e-3, reg_weight=0.1, threads=1)


def test_alignment_with_anchors_moves_class_means_towards_the_targets(stage1, refs, tmp_path):
    records = {}
    for weight in (0.0, 20.0):
        out = tmp_path / f"aligned_{weight}"
        align(stage1, refs, out, AlignConfig(class_anchor_weight=weight, **CFG), quiet=True)
        records[weight] = json.loads((out / "align.json").read_text())
    anchored = records[20.0]["class_means"]
    assert "anchors" not in records[0.0]["class_means"]
    assert anchored["estimate"] == "mixture"
    anchors = torch.tensor(anchored["anchors"])
    before = torch.tensor(anchored["before"])
    assert torch.equal(before, torch.tensor(records[0.0]["class_means"]["before"]))
    present = torch.tensor(anchored["shares"]) > 0

    def distance(means):
        return float((torch.as_tensor(means) - anchors)[:, present].pow(2).mean())

    assert distance(anchored["after"]) < 0.5 * distance(before)
    assert distance(anchored["after"]) < distance(records[0.0]["class_means"]["after"])
    log = (tmp_path / "aligned_20.0" / "log.csv").read_text().splitlines()
    assert "anchor" in log[0].split(",")


def test_an_anchor_segmenter_labels_the_references_for_the_anchors(source, stage1, refs, tmp_path):
    seg = train(
        source, tmp_path / "seg", TrainConfig(steps=30, **TINY_TRAIN), quiet=True
    ).final_checkpoint
    out = tmp_path / "aligned"
    cfg = AlignConfig(class_anchor_weight=20.0, anchor_segmenter=str(seg), **CFG)
    align(stage1, refs, out, cfg, quiet=True)
    record = json.loads((out / "align.json").read_text())["class_means"]
    assert record["estimate"] == "labels"
    # the anchors are the references' class means under that segmenter's labels
    model = SynthModel.load(stage1)
    ref = read_references(refs, model.prep, 2)
    labels = segmenter_labels(seg, ref.images, 3, "cpu")
    means, shares = class_means(ref.images, ref.foreground, labels, 3)
    given = shares > 0
    assert given.sum() >= 2
    anchors = torch.tensor(record["anchors"])
    assert torch.allclose(anchors[:, given], means[:, given], atol=1e-5)
    present = torch.tensor(record["shares"]) > 0
    moved = (torch.tensor(record["after"]) - anchors)[:, present].pow(2).mean()
    assert moved < (torch.tensor(record["before"]) - anchors)[:, present].pow(2).mean()


def test_a_missing_anchor_segmenter_is_named(stage1, refs, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nope.pt"
    cfg = AlignConfig(class_anchor_weight=1.0, anchor_segmenter=str(missing), **CFG)
    with pytest.raises(DataError, match="nope.pt"):
        align(stage1, refs, tmp_path / "out", cfg, quiet=True)
    assert not (tmp_path / "out").exists()
    monkeypatch.chdir(tmp_path)
    argv = ["synth", "align", "--model", str(stage1), "--references", str(refs), "--out", "al"]
    assert main([*argv, "--class-anchor-weight", "1", "--anchor-segmenter", "nope.pt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["medflow synth align: error: nope.pt: anchor segmenter checkpoint not found"]
    assert main([*argv, "--anchor-segmenter", "nope.pt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs class_anchor_weight > 0" in err[0]
    assert not (tmp_path / "al").exists()
