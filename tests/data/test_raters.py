"""Simulated raters: exact per-voxel marginals, spatial coherence, exact unit variance of the
smoothed field, input checks; reading several annotations into slices and drawing one per row.
Every volume here is tiny and synthetic."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_nnunet_dataset
from scipy.ndimage import gaussian_filter

from medflow.data.datasets import SliceSet, load_slices, plan_preprocessing
from medflow.data.layout import load_dataset
from medflow.data.raters import (
    field_variance,
    labels_from_uniform,
    simulate_raters,
    unit_variance_field,
)
from medflow.errors import DataError


def random_probs(shape, seed=0, floor=0.2) -> np.ndarray:
    """``(3, *shape)`` class probabilities, each at least ``floor / 3``, plus four voxels of
    certainty: background, grey matter, white matter, and GM/WM half and half."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet([1.0, 1.0, 1.0], size=shape).astype(np.float64)
    p = (1 - floor) * np.moveaxis(p, -1, 0) + floor / 3
    p[:, 0, 0, 0] = (1, 0, 0)
    p[:, 1, 0, 0] = (0, 1, 0)
    p[:, 2, 0, 0] = (0, 0, 1)
    p[:, 3, 0, 0] = (0, 0.5, 0.5)
    return p


def frequencies(raters: np.ndarray, k: int) -> np.ndarray:
    """``(k, X, Y, Z)`` fraction of raters giving each label."""
    return np.stack([(raters == c).mean(axis=0) for c in range(k)])


def neighbour_agreement(raters: np.ndarray, axis: int) -> float:
    """Fraction of pairs of voxels adjacent along spatial ``axis`` with the same label."""
    a = np.moveaxis(raters, axis + 1, 1)
    return float((a[:, 1:] == a[:, :-1]).mean())


# ------------------------------------------------------------------------------ marginals


@pytest.mark.parametrize("correlation_mm", [0.0, 3.0])
def test_label_frequencies_converge_to_the_probabilities(correlation_mm):
    n, shape = 400, (12, 12, 6)
    probs = random_probs(shape)
    raters = simulate_raters(probs, n, correlation_mm, (1.0, 1.0, 2.0), np.random.default_rng(1))
    assert raters.shape == (n, *shape) and raters.dtype == np.uint8
    freq = frequencies(raters, 3)
    # raters are independent, so each frequency is binomial(n, p) / n around p; the floor
    # keeps n p >= 26, where 5 standard errors are a bound exceeded with odds ~1e-6 a cell
    sigma = np.sqrt(probs * (1 - probs) / n)
    uncertain = sigma > 0
    assert np.max(np.abs(freq - probs)[uncertain] / sigma[uncertain]) < 5
    # certain voxels are certain for every rater; 50/50 never gives background
    assert np.array_equal(freq[:, :3, 0, 0], np.eye(3))
    assert freq[0, 3, 0, 0] == 0 and 0.4 < freq[1, 3, 0, 0] < 0.6


def test_class_one_takes_the_low_uniforms_and_background_the_high():
    # p = (bg 0.3, GM 0.2, WM 0.5): GM for u < 0.2, WM for 0.2 <= u < 0.7, background after
    u = np.array([0.0, 0.1999, 0.2, 0.6999, 0.7, 0.9999])
    p = np.array([[0.3] * 6, [0.2] * 6, [0.5] * 6])
    bounds = np.cumsum(p[1:], axis=0)
    assert labels_from_uniform(u, bounds).tolist() == [1, 1, 2, 2, 0, 0]


def test_the_same_seed_draws_the_same_raters_and_raters_differ():
    probs = random_probs((8, 8, 4))
    a = simulate_raters(probs, 3, 2.0, (1, 1, 1), np.random.default_rng(5))
    b = simulate_raters(probs, 3, 2.0, (1, 1, 1), np.random.default_rng(5))
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])


# ----------------------------------------------------------------------------- coherence


def test_a_long_correlation_length_makes_neighbours_agree():
    shape, k = (16, 16, 16), np.array([0.4, 0.3, 0.3])
    probs = np.broadcast_to(k[:, None, None, None], (3, *shape))
    independent = simulate_raters(probs, 20, 0.0, (1, 1, 1), np.random.default_rng(0))
    coherent = simulate_raters(probs, 20, 4.0, (1, 1, 1), np.random.default_rng(0))
    # independent voxels agree with probability sum p_k^2 = 0.34 (20 * 15 * 256 pairs)
    assert neighbour_agreement(independent, 0) == pytest.approx(np.sum(k**2), abs=0.02)
    assert neighbour_agreement(coherent, 0) > 0.85


def test_the_correlation_length_is_in_millimetres_per_axis():
    # 4 mm is 4 voxels in-plane but 1 voxel through the 4 mm slices
    probs = np.broadcast_to(np.array([0.4, 0.3, 0.3])[:, None, None, None], (3, 16, 16, 16))
    raters = simulate_raters(probs, 20, 4.0, (1.0, 1.0, 4.0), np.random.default_rng(0))
    assert neighbour_agreement(raters, 0) > neighbour_agreement(raters, 2) + 0.15
    assert abs(neighbour_agreement(raters, 0) - neighbour_agreement(raters, 1)) < 0.03


# ---------------------------------------------------------------------- unit variance


@pytest.mark.parametrize("sigmas", [(1.3, 0.0, 2.1), (0.7, 3.0, 5.0), (0.0, 0.0, 0.0)])
def test_field_variance_is_that_of_the_filter_at_every_voxel(sigmas):
    # the filter is linear: the variance it gives unit white noise at x is the sum over
    # source voxels y of (response at x to a delta at y)^2, borders included
    shape = (7, 5, 4)
    total = np.zeros(shape)
    unit = np.zeros(shape)
    for y in np.ndindex(shape):
        delta = np.zeros(shape)
        delta[y] = 1.0
        smoothed = gaussian_filter(delta, sigmas, mode="reflect", truncate=4.0)
        total += smoothed**2
        unit += unit_variance_field(delta, sigmas) ** 2
    assert np.allclose(field_variance(shape, sigmas), total, rtol=1e-12, atol=0)
    assert np.allclose(unit, 1.0, rtol=1e-12, atol=0)
    if any(sigmas):
        # reflection folds the kernel at the border: the variance is not uniform there
        assert total[0, 0, 0] > total[3, 2, 2]


def test_the_field_scale_does_not_depend_on_the_draw():
    # normalising by the draw's own std would map 3 * noise to the same field
    noise = np.random.default_rng(0).standard_normal((9, 8, 6))
    field = unit_variance_field(noise, (2.0, 2.0, 1.0))
    assert np.allclose(unit_variance_field(3 * noise, (2.0, 2.0, 1.0)), 3 * field)


def test_the_smoothed_field_has_unit_variance_empirically():
    rng, draws, shape = np.random.default_rng(2), 3000, (6, 6, 4)
    fields = np.stack(
        [unit_variance_field(rng.standard_normal(shape), (3.0, 3.0, 1.5)) for _ in range(draws)]
    )
    # the sample variance of 3000 normal draws has standard error sqrt(2 / 3000) ~ 0.026
    assert np.max(np.abs(fields.var(axis=0) - 1)) < 5 * np.sqrt(2 / draws)
    assert np.max(np.abs(fields.mean(axis=0))) < 5 / np.sqrt(draws)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        ((slice(None), 2, 1, 0), (0.5, 0.25, 0.125), r"voxel \(2, 1, 0\) sums to 0.875"),
        ((0, 0, 0, 0), -0.5, r"found -0.5 at class 0, voxel \(0, 0, 0\)"),
        ((2, 1, 1, 1), np.nan, r"found nan at class 2, voxel \(1, 1, 1\)"),
    ],
)
def test_probabilities_that_are_not_a_distribution_are_refused(index, value, message):
    probs = random_probs((4, 3, 2))
    probs[index] = value
    with pytest.raises(ValueError, match=message):
        simulate_raters(probs, 2, 1.0, (1, 1, 1), np.random.default_rng(0))


def test_bad_shapes_counts_and_lengths_are_refused():
    probs, rng = random_probs((4, 3, 2)), np.random.default_rng(0)
    with pytest.raises(ValueError, match="K >= 2"):
        simulate_raters(np.ones((1, 4, 3, 2)), 2, 1.0, (1, 1, 1), rng)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        simulate_raters(probs, 0, 1.0, (1, 1, 1), rng)
    with pytest.raises(ValueError, match="correlation_mm must be"):
        simulate_raters(probs, 2, -1.0, (1, 1, 1), rng)
    with pytest.raises(ValueError, match="3 positive voxel sizes"):
        simulate_raters(probs, 2, 1.0, (1, 1), rng)


# --------------------------------------------------------------- slices with several raters


def slice_set(n=5, r=4, size=6) -> SliceSet:
    # annotation r of slice i is filled with 10 i + r: a drawn mask tells both apart
    raters = (10 * torch.arange(n)[:, None] + torch.arange(r)[None, :]).to(torch.uint8)
    raters = raters[:, :, None, None].expand(n, r, size, size).contiguous()
    images = torch.zeros(n, 1, size, size)
    return SliceSet(images, raters[:, 0].clone(), [f"c{i}" for i in range(n)], raters)


def test_draw_masks_picks_a_random_rater_of_each_row():
    s = slice_set()
    idx = torch.tensor([3] * 64 + list(range(5)))
    drawn = s.draw_masks(idx, torch.Generator().manual_seed(0))
    assert drawn.shape == (69, 6, 6) and drawn.dtype == torch.uint8
    values = drawn[:, 0, 0].long()
    # each row is one whole annotation of its own slice, never another slice's
    assert torch.equal(drawn, drawn[:, :1, :1].expand_as(drawn))
    assert torch.equal(values // 10, idx)
    # the 64 rows of slice 3 spread over all four raters
    assert set((values[:64] % 10).tolist()) == {0, 1, 2, 3}
    again = s.draw_masks(idx, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)


def test_draw_masks_without_raters_is_the_masks_and_subset_keeps_raters():
    s = slice_set()
    plain = SliceSet(s.images, s.masks, s.case_ids)
    idx = torch.tensor([4, 0, 4])
    assert torch.equal(plain.draw_masks(idx, torch.Generator()), s.masks[idx])
    sub = s.subset([4, 1])
    assert sub.raters is not None and torch.equal(sub.raters, s.raters[[4, 1]])
    assert plain.subset([1]).raters is None


def write_raters(root, split="Tr", values=("copy", "zeros")) -> None:
    """ratersTr/{case}_rater01.. for every labelled case: a copy of the label or zeros."""
    (root / f"raters{split}").mkdir(exist_ok=True)
    for label in sorted((root / f"labels{split}").iterdir()):
        img = nib.load(str(label))
        case = label.name[: -len(".nii.gz")]
        for r, kind in enumerate(values, start=1):
            data = np.asarray(img.dataobj)
            data = data if kind == "copy" else np.zeros_like(data)
            path = root / f"raters{split}" / f"{case}_rater{r:02d}.nii.gz"
            nib.save(nib.Nifti1Image(data, img.affine), str(path))


def test_load_slices_reads_every_rater_resized_as_the_mask(tmp_path):
    root = make_nnunet_dataset(tmp_path / "ds", n_train=2, n_test=1)
    write_raters(root)
    spec = load_dataset(root)
    prep = plan_preprocessing(spec, spec.training, (16, 16))
    s = load_slices(spec.training, prep, spec.num_classes)
    assert s.raters is not None and s.raters.shape == (10, 3, 16, 16)
    assert s.raters.dtype == torch.uint8
    assert torch.equal(s.raters[:, 0], s.masks) and torch.equal(s.raters[:, 1], s.masks)
    assert s.masks.any() and not s.raters[:, 2].any()
    plain = load_slices(spec.test, prep, spec.num_classes)
    assert plain.raters is None
    with pytest.raises(DataError, match="has 1 annotation"):
        load_slices(spec.training + spec.test, prep, spec.num_classes)
