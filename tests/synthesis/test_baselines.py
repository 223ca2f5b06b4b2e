"""The baselines' training sets: strong augmentation and histogram matching keep the source's
geometry and zero background, and change the appearance as intended."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_nnunet_dataset

from medflow.data.io import read_image, read_label
from medflow.data.layout import load_dataset, verify_dataset
from medflow.data.naming import is_synthetic
from medflow.synthesis.align import References
from medflow.synthesis.baselines import (
    augment_volume,
    augmented_dataset,
    histogram_matched_dataset,
    match_tissue,
)


def _head(seed: int = 0) -> np.ndarray:
    """A (1, 24, 20, 6) volume: zero background, tissue in an ellipse at 20..60."""
    rng = np.random.default_rng(seed)
    xx, yy = np.meshgrid(np.arange(24), np.arange(20), indexing="ij")
    inside = ((xx - 12) / 10) ** 2 + ((yy - 10) / 8) ** 2 < 1
    vol = np.where(inside[..., None], rng.uniform(20, 60, (24, 20, 6)), 0.0)
    return vol[None].astype(np.float32)


def test_augmentation_keeps_the_head_and_changes_its_appearance():
    vol = _head()
    a, b, again = augment_volume(vol, 2, 1), augment_volume(vol, 2, 2), augment_volume(vol, 2, 1)
    assert np.array_equal(a, again)  # seeded
    for out in (a, b):
        assert out.shape == vol.shape and np.isfinite(out).all()
        assert np.array_equal(out != 0, vol != 0)  # background stays exactly 0, tissue > 0
    # tissue intensities are not an affine map of the source's (which the z-score would undo)
    tissue = vol[0] != 0
    corr = np.corrcoef(vol[0][tissue], a[0][tissue])[0, 1]
    assert corr < 0.99 and not np.allclose(a, b)


def test_histogram_matching_takes_the_reference_distribution():
    vol = _head()[0]
    target = np.random.default_rng(1).exponential(size=4000)
    out = match_tissue(vol, target)
    tissue = vol != 0
    assert np.array_equal(out != 0, tissue)
    # same order as the source, the target's shape (up to the shift that keeps it above 0)
    order = np.argsort(vol[tissue])
    assert np.all(np.diff(out[tissue][order]) >= 0)
    shifted = out[tissue] - out[tissue].min()
    want = target - np.quantile(target, 0.5 / tissue.sum())
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(shifted, q) - np.quantile(want, q)) < 0.1


def test_baseline_datasets_are_readable_and_keep_the_labels(tmp_path):
    source = make_nnunet_dataset(tmp_path / "src", n_train=2, n_test=1)
    spec = load_dataset(source)
    aug = augmented_dataset(source, tmp_path / "aug", copies=2, slice_axis=2, seed=0)
    assert verify_dataset(aug) == []
    cases = load_dataset(aug).training
    assert len(cases) == 3 * len(spec.training)
    first = spec.training[0]
    for case in cases:
        if case.case_id.endswith(first.case_id):
            assert np.array_equal(read_label(case.label).array, read_label(first.label).array)
    refs = References(
        torch.randn(3, 1, 8, 8) ** 2, torch.ones(3, 1, 8, 8, dtype=torch.bool), ["r.nii.gz"]
    )
    hist = histogram_matched_dataset(source, refs, tmp_path / "hist")
    assert verify_dataset(hist) == []
    matched = read_image(load_dataset(hist).training[0].images).array
    original = read_image(first.images).array
    # the source has no zero background: every voxel is mapped, in the same order
    assert matched.shape == original.shape
    assert (
        np.corrcoef(
            np.argsort(np.argsort(matched.ravel())), np.argsort(np.argsort(original.ravel()))
        )[0, 1]
        > 0.999
    )


def test_augmented_copies_of_synthetic_cases_stay_synthetic(tmp_path):
    source = make_nnunet_dataset(tmp_path / "src", n_train=2, n_test=1)
    first = load_dataset(source).training[0].case_id
    for folder, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
        path = source / folder / f"{first}{suffix}.nii.gz"
        path.rename(source / folder / f"synth_00000{suffix}.nii.gz")
    aug = augmented_dataset(source, tmp_path / "aug", copies=2, slice_axis=2, seed=0)
    ids = sorted(c.case_id for c in load_dataset(aug).training)
    assert len(ids) == 6
    assert [i for i in ids if is_synthetic(i)] == [
        "synth_00000",
        "synth_00000_aug0",
        "synth_00000_aug1",
    ]
