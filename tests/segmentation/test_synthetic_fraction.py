"""A fixed real : synthetic ratio per training batch (``TrainConfig.synthetic_fraction``)."""

import pytest
from conftest import TINY_TRAIN, make_nnunet_dataset

import medflow.segmentation.train as train_module
from medflow.data.naming import is_synthetic
from medflow.errors import DataError
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.train import train


def _with_synthetic(root, n_real=2, n_synthetic=6):
    """A tiny dataset whose last ``n_synthetic`` training cases are named as ``synth sample``
    names its cases."""
    make_nnunet_dataset(root, n_train=n_real + n_synthetic, n_test=1)
    for i in range(n_real, n_real + n_synthetic):
        for folder, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
            src = root / folder / f"case{i:02d}{suffix}.nii.gz"
            src.rename(root / folder / f"synth_{i:05d}{suffix}.nii.gz")
    return root


def _drawn_kinds(monkeypatch, data, out, **fields):
    """Run a tiny training and return, per step, how many of its batch's slices were
    synthetic."""
    counts = []
    draw = train_module._Run.draw_batch

    def spy(run):
        idx = draw(run)
        counts.append(sum(is_synthetic(run.train_set.case_ids[i]) for i in idx.tolist()))
        return idx

    monkeypatch.setattr(train_module._Run, "draw_batch", spy)
    cfg = TrainConfig(steps=6, val_fraction=0, **{**TINY_TRAIN, "batch_size": 8, **fields})
    train(data, out, cfg, quiet=True)
    return counts


def test_every_batch_holds_the_fixed_share_of_synthetic_slices(tmp_path, monkeypatch):
    data = _with_synthetic(tmp_path / "ds")
    counts = _drawn_kinds(monkeypatch, data, tmp_path / "run", synthetic_fraction=0.25)
    assert counts == [2] * 6  # 0.25 of 8, although 6 of the 8 cases are synthetic


def test_without_the_fraction_batches_follow_the_slice_counts(tmp_path, monkeypatch):
    data = _with_synthetic(tmp_path / "ds")
    counts = _drawn_kinds(monkeypatch, data, tmp_path / "run")
    # uniform over slices, 3 in 4 synthetic: 36 of 48 expected, never exactly 2 per batch
    assert sum(counts) > 24 and counts != [2] * 6


def test_the_fraction_needs_both_kinds_of_case(tmp_path):
    data = make_nnunet_dataset(tmp_path / "real_only")
    cfg = TrainConfig(steps=2, synthetic_fraction=0.5, **TINY_TRAIN)
    with pytest.raises(DataError, match="no synthetic"):
        train(data, tmp_path / "run", cfg, quiet=True)
    assert not (tmp_path / "run").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="synthetic_fraction must be in"):
        TrainConfig(synthetic_fraction=1.0)
