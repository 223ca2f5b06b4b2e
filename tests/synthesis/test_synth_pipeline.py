"""Stage 1, stage 2 and sampling at tiny size, through the Python API and the CLI."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_SYNTH, make_nnunet_dataset

from medflow.cli import main
from medflow.data.datasets import load_slices, plan_preprocessing
from medflow.data.layout import load_dataset, verify_dataset
from medflow.synthesis.align import align, read_references
from medflow.synthesis.config import AlignConfig, SynthConfig
from medflow.synthesis.model import SynthModel
from medflow.synthesis.sample import case_groups, sample_dataset, to_raw
from medflow.synthesis.train import train_synth


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_nnunet_dataset(tmp_path_factory.mktemp("src") / "ds", n_train=4, n_test=2)


@pytest.fixture(scope="module")
def stage1(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1")
    return train_synth(source, out, SynthConfig(steps=100, lr=3e-3, **TINY_SYNTH), quiet=True)


def _references(folder: Path, source: Path, power: float = 3.0) -> Path:
    """Target-site references: the source's test images through a contrast change
    ``(x / 100) ** power`` (unlabelled), one slice per file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted((source / "imagesTs").glob("*.nii.gz"))):
        img = nib.load(path)
        data = np.clip(img.get_fdata().astype(np.float32), 0, None) / 100.0
        for z in range(2):
            shifted = (data[:, :, z : z + 1] ** power).astype(np.float32)
            nib.save(nib.Nifti1Image(shifted, img.affine), str(folder / f"ref{i}{z}_0000.nii.gz"))
    return folder


def _skewness(images: torch.Tensor) -> float:
    """Mean skewness of the images' intensities (the contrast change makes them skewed)."""
    x = images.flatten(1)
    z = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    return float(z.pow(3).mean())


def test_stage1_checkpoint_round_trip(stage1, source):
    model = SynthModel.load(stage1)
    assert model.labels == {"background": 0, "a": 1, "b": 2}
    assert model.file_ending == ".nii.gz" and model.size == (16, 16)
    assert model.alignment is None and model.sample_steps == 3
    # the tiny source has no zero background: intensities are written as generated
    assert model.background_level is None
    for name in ("config.json", "log.csv", "preview.png", "preview_masks.png"):
        assert (stage1.parent / name).is_file()


def test_alignment_moves_generated_images_towards_the_references(stage1, source, tmp_path):
    refs = _references(tmp_path / "refs", source)
    model = SynthModel.load(stage1)
    refs_read = read_references(refs, model.prep, k=3)
    ref_slices, files = refs_read.images, refs_read.files
    assert ref_slices.shape == (3, 1, 16, 16) and len(files) == 3
    cfg = AlignConfig(k=3, steps=60, batch_size=8, sampler_steps=4, lr=2e-3, threads=1)
    aligned = align(stage1, refs, tmp_path / "al", cfg, quiet=True)
    summary = json.loads((aligned.parent / "align.json").read_text())
    assert summary["reward_after"] < 0.8 * summary["reward_before"]

    # the same masks and noise through both models: the references' intensities are skewed
    # (~3) by the contrast change, the source's much less; the aligned images must be closer
    # to the references in that than the stage-1 ones
    after = SynthModel.load(aligned)
    assert after.alignment["references"] == files and after.sample_steps == 4
    masks = model.mask_flow.sample(16, model.size, torch.Generator().manual_seed(0), 4)
    x_before = model.image_flow.sample(masks, torch.Generator().manual_seed(1), 4)
    x_after = after.image_flow.sample(masks, torch.Generator().manual_seed(1), 4)
    target = _skewness(ref_slices)
    before, now = _skewness(x_before), _skewness(x_after)
    assert abs(now - target) < 0.5 * abs(before - target), (before, now, target)

    with pytest.raises(Exception, match="already aligned"):
        align(aligned, refs, tmp_path / "again", cfg, quiet=True)

    # sampled sets of one seed share their masks, aligned or not: alignment changes images
    a = sample_dataset(stage1, tmp_path / "unaligned", 3, seed=2, quiet=True)
    b = sample_dataset(aligned, tmp_path / "aligned", 3, seed=2, quiet=True)
    assert a["medflow"]["mask_steps"] == b["medflow"]["mask_steps"] == 3
    assert a["medflow"]["steps"] == 3 and b["medflow"]["steps"] == cfg.sampler_steps == 4
    la = nib.load(tmp_path / "unaligned" / "labelsTr" / "synth_00000.nii.gz").get_fdata()
    lb = nib.load(tmp_path / "aligned" / "labelsTr" / "synth_00000.nii.gz").get_fdata()
    assert np.array_equal(la, lb)


def test_sampled_dataset_reads_back_as_generated(stage1, source, tmp_path):
    meta = sample_dataset(stage1, tmp_path / "syn", 10, seed=3, include_source=source, quiet=True)
    out = tmp_path / "syn"
    assert verify_dataset(out) == []
    # 3D source: the 10 pairs are stacked into volumes (a dataset holds 2D or 3D, not both)
    assert meta["medflow"]["synthetic_cases"] == len(case_groups(10, True, 8)) == 1
    assert meta["numTraining"] == 1 + 4 and (out / "preview.png").is_file()
    spec = load_dataset(out)
    synth = [c for c in spec.training if c.case_id.startswith("synth_")]
    prep = plan_preprocessing(spec, spec.training, (16, 16))
    slices = load_slices(synth, prep, 3)
    assert slices.images.shape == (10, 1, 16, 16)

    model = SynthModel.load(stage1)
    gen = torch.Generator().manual_seed(3)
    masks = model.mask_flow.sample(10, model.size, gen, model.sample_steps)
    images = model.image_flow.sample(masks, gen, model.sample_steps)
    assert torch.equal(slices.masks, masks)
    # re-normalised by the reader: the same image up to a per-volume affine map
    corr = np.corrcoef(slices.images.flatten().numpy(), images.flatten().numpy())[0, 1]
    assert corr > 0.99


def test_case_groups_and_raw_intensities():
    assert [len(g) for g in case_groups(5, False, 8)] == [1] * 5
    sizes = [len(g) for g in case_groups(21, True, 8)]
    assert sum(sizes) == 21 and min(sizes) >= 8 and max(sizes) <= 15
    with pytest.raises(Exception, match="--n must be >= 2"):
        case_groups(1, True, 8)
    img = np.array([[-1.5, -1.45], [0.0, 2.0]], dtype=np.float32)
    raw = to_raw(img, background_level=-1.5, ending=".nii.gz")
    # within the tolerance of the background level -> exactly 0, the rest shifted
    assert raw.tolist() == [[0.0, 0.0], [1.5, 3.5]]
    png = to_raw(img, None, ".png")
    assert png.dtype == np.uint8 and png.min() == 0 and png.max() == 255


def test_cli_end_to_end(source, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refs = _references(tmp_path / "refs", source)
    tiny = ["--size", "16", "--mask-channels", "8,16", "--image-channels", "8,16", "--threads", "1"]
    assert (
        main(
            [
                "synth",
                "train",
                "--data",
                str(source),
                "--out",
                "s1",
                "--steps",
                "3",
                "--sample-steps",
                "2",
                *tiny,
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "synth",
                "align",
                "--model",
                "s1/synth.pt",
                "--references",
                str(refs),
                "--out",
                "al",
                "--k",
                "1",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--sampler-steps",
                "2",
                "--threads",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    assert "reward (feature MMD^2 to 1 reference slice(s))" in capsys.readouterr().out
    assert (
        main(
            [
                "synth",
                "sample",
                "--model",
                "al/synth.pt",
                "--out",
                "syn",
                "--n",
                "6",
                "--include-source",
                str(source),
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["datasets", "verify", "syn"]) == 0
    assert (
        main(
            [
                "train",
                "--data",
                "syn",
                "--out",
                "run",
                "--steps",
                "2",
                "--size",
                "16",
                "--channels",
                "8,16",
                "--batch-size",
                "4",
                "--threads",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    assert Path("run/checkpoint_final.pt").is_file()
    record = json.loads(Path("syn/dataset.json").read_text())["medflow"]
    assert record["aligned"] and record["synthetic_pairs"] == 6 and record["source_cases"] == 4


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_cli_bad_input(stage1, source, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails(
        capsys,
        ["synth", "align", "--model", str(stage1), "--references", "nowhere", "--out", "al"],
        "nowhere: reference folder not found",
    )
    Path("empty").mkdir()
    _fails(
        capsys,
        ["synth", "align", "--model", str(stage1), "--references", "empty", "--out", "al"],
        "medflow synth align: error: empty: holds no image files ending in .nii.gz",
    )
    refs = _references(tmp_path / "refs", source)
    _fails(
        capsys,
        [
            "synth",
            "align",
            "--model",
            str(stage1),
            "--references",
            str(refs),
            "--out",
            "al",
            "--k",
            "9",
        ],
        "fewer than k=9",
    )
    assert not Path("al").exists()
    Path("syn").mkdir()
    Path("syn/keep.txt").write_text("user data")
    _fails(
        capsys,
        ["synth", "sample", "--model", str(stage1), "--out", "syn", "--n", "2"],
        "already exists",
    )
    assert Path("syn/keep.txt").read_text() == "user data"
    seg = tmp_path / "seg.pt"
    torch.save({"format": "medflow-checkpoint-v1"}, seg)
    _fails(
        capsys,
        ["synth", "sample", "--model", str(seg), "--out", "s2", "--n", "2"],
        "is not one this medflow reads here ('medflow-synth-v1')",
    )
    _fails(
        capsys,
        [
            "synth",
            "train",
            "--data",
            str(source),
            "--out",
            "s1",
            "--size",
            "10",
            "--mask-channels",
            "8,16,32",
            "--image-channels",
            "8,16,32",
        ],
        "size must be a multiple of 4",
    )
    assert not Path("s2").exists() and not Path("s1").exists()
