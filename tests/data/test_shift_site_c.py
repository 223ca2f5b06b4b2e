"""Site-c of the simulated acquisition shift (non-monotone contrast, Gibbs ringing, motion
ghosts, Rician noise) and its embedded dataset ``mni152-tissue-site-c``."""

import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from medflow.cli import main
from medflow.data import builtin
from medflow.data.builtin import build
from medflow.data.layout import load_dataset, verify_dataset
from medflow.data.shift import (
    LATER_FIELDS,
    PHASE_ENCODE_AXIS,
    SITES,
    AcquisitionShift,
    apply_shift,
    remap_contrast,
)
from medflow.data.transforms import Preprocessing, normalise
from medflow.errors import MedflowError

# every component off: the identity up to round-off
NONE = AcquisitionShift(gamma=1.0, bias_strength=0.0, noise_std=0.0, downsample=1)
ZSCORE = Preprocessing(schemes=("zscore",), slice_axis=2, size=(16, 16))
SITE_B_FIELDS = ["gamma", "bias_strength", "bias_order", "noise_std", "downsample", "blur_sigma"]


@pytest.fixture
def head():
    """A skull-stripped "head" (48 x 56 x 6) in an exactly-zero background: a white-matter
    core (0.8), a grey-matter ring (0.5), a fluid ring (0.2), each with a +-0.1 texture;
    returns ``(volume, labels)``, labels 1 = grey, 2 = white, 0 elsewhere."""
    x, y = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 56), indexing="ij")
    r = np.repeat(np.sqrt((x / 0.8) ** 2 + (y / 0.9) ** 2)[:, :, None], 6, axis=2)
    labels = np.where(r < 0.5, 2, np.where(r < 0.8, 1, 0)).astype(np.uint8)
    level = np.select([r < 0.5, r < 0.8, r < 0.95], [0.8, 0.5, 0.2], 0.0)
    texture = np.random.default_rng(123).uniform(-0.1, 0.1, r.shape)
    return np.where(level > 0, level + texture, 0.0).astype(np.float32), labels


def _gap(volume, labels):
    """White minus grey matter mean after medflow's per-image z-score."""
    z = normalise(volume[None], ZSCORE)[0]
    return float(z[labels == 2].mean() - z[labels == 1].mean())


# ------------------------------------------------------------------ site-b is unchanged


def test_new_fields_off_leave_site_b_and_its_draws_unchanged(head):
    volume, _ = head
    site_b = SITES["site-b"]
    explicit = AcquisitionShift(
        remap_peak=0.0, kspace_fraction=1.0, ghost_phase=0.0, ghost_period=4, rician_std=0.0
    )
    assert explicit == site_b and not site_b.uses_kspace
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    a = apply_shift(volume, site_b, rng_a)
    b = apply_shift(volume, explicit, rng_b)
    assert a.tobytes() == b.tobytes()
    # site-b draws exactly what it drew before the new components: the 19 coefficients of
    # a degree-3 polynomial without its constant, then noise on the 2x coarser grid
    rng_ref = np.random.default_rng(5)
    rng_ref.standard_normal(math.comb(site_b.bias_order + 3, 3) - 1)
    rng_ref.standard_normal((24, 28, 6))
    assert rng_a.random() == rng_ref.random()


def test_site_b_record_keeps_its_keys_and_older_records_load():
    record = SITES["site-b"].to_dict()
    # mni152-tissue-shifted's dataset.json holds this dict: no new keys in it
    assert list(record) == SITE_B_FIELDS
    assert AcquisitionShift(**record) == SITES["site-b"]
    site_c = SITES["site-c"].to_dict()
    # a shift that uses a later component records all of them, its ghost period included
    assert list(site_c) == SITE_B_FIELDS + list(LATER_FIELDS)
    assert AcquisitionShift(**site_c) == SITES["site-c"]


def test_site_c_is_another_kind_of_shift():
    c = SITES["site-c"]
    # none of site-b's components...
    assert (c.gamma, c.bias_strength, c.noise_std, c.downsample) == (1.0, 0.0, 0.0, 1)
    # ...and all of the new ones
    assert c.remap_peak > 0 and c.kspace_fraction < 1 and c.ghost_phase > 0
    assert c.rician_std > 0


# ----------------------------------------------------------------------- site-c overall


def test_site_c_stays_inside_the_head_and_follows_its_seed(head):
    volume, _ = head
    rng = np.random.default_rng(0)
    out = apply_shift(volume, SITES["site-c"], rng)
    assert out.dtype == np.float32 and out.shape == volume.shape
    assert np.all(out[volume == 0] == 0) and np.all(out[volume != 0] > 0)
    assert np.abs(out - volume)[volume != 0].mean() > 0.05
    # its draws: ghost line offsets and phases per slice, then the two noise channels
    ref = np.random.default_rng(0)
    ref.integers(4, size=6), ref.uniform(0.5, 1.0, size=6)
    ref.standard_normal(volume.shape), ref.standard_normal(volume.shape)
    assert rng.random() == ref.random()
    again = apply_shift(volume, SITES["site-c"], np.random.default_rng(0))
    other = apply_shift(volume, SITES["site-c"], np.random.default_rng(1))
    assert np.array_equal(out, again) and np.abs(out - other).max() > 0.05


# ---------------------------------------------------------------------- contrast remap


def test_remap_reverses_what_no_gamma_can(head):
    volume, labels = head
    gammas = np.geomspace(0.02, 20, 25)
    gamma_gaps = [
        _gap(apply_shift(volume, replace(NONE, gamma=float(g)), np.random.default_rng(0)), labels)
        for g in gammas
    ]
    # an increasing curve keeps white matter above grey matter (every voxel of it is)
    assert min(gamma_gaps) > 0.5
    # peaking below white matter, the remap puts it under grey matter: the other sign
    low = apply_shift(volume, replace(NONE, remap_peak=0.7), np.random.default_rng(0))
    assert _gap(low, labels) < -0.05
    # site-c's peak keeps the order but narrows the gap below anything gamma reaches
    p = SITES["site-c"].remap_peak
    site = apply_shift(volume, replace(NONE, remap_peak=p), np.random.default_rng(0))
    assert _gap(site, labels) < min(gamma_gaps) - 0.05
    # beyond the peak the order of intensities is reversed, within one tissue
    u = np.linspace(0.5, 1.5, 101)
    y = remap_contrast(u, p)
    assert np.all(np.diff(y[u < p]) > 0) and np.all(np.diff(y[u > p]) < 0)
    assert y.max() == pytest.approx(p, rel=1e-3)


# --------------------------------------------------------------------- k-space artefacts


def _block_on_dim_fill(shape=(64, 64, 4)):
    """A bright 4 x 4 block (1.0) on a dim fill (0.05) covering the whole field of view, so
    that nothing the k-space spreads is masked out."""
    volume = np.full(shape, 0.05)
    volume[30:34, 30:34] = 1.0
    return volume


def test_ghosts_replicate_along_the_phase_encode_axis_only():
    volume = _block_on_dim_fill()
    shift = replace(NONE, ghost_phase=math.pi, ghost_period=4)
    diff = np.abs(apply_shift(volume, shift, np.random.default_rng(2)) - volume)
    assert PHASE_ENCODE_AXIS == 1
    # mean |change| over the block rolled by d voxels along each axis
    along = [diff[30:34, np.r_[30:34] - d].mean() for d in range(64)]
    across = [diff[np.r_[30:34] - d, 30:34].mean() for d in range(64)]
    # the three ghosts sit n / period = 16 voxels apart, each with |exp(i phi) - 1| / 4 of
    # the block, phi in [pi / 2, pi]: 0.35-0.5 of it, up to the fill they add to
    assert sorted(np.argsort(along[1:])[-3:] + 1) == [16, 32, 48]
    assert all(0.3 < along[d] < 0.55 for d in (16, 32, 48))
    # outside the ghosts, and across the phase-encode axis, the fill barely changes
    clear = [d for d in range(64) if min(d % 16, 16 - d % 16) >= 4]
    assert max(along[d] for d in clear) < 0.04 and max(across[4:61]) < 0.04


def test_gibbs_ringing_oscillates_at_an_edge():
    # a step from 0.3 to 0.9 along axis 0 at index 32, the whole field of view nonzero
    volume = np.repeat(np.where(np.arange(64) < 32, 0.3, 0.9)[:, None, None], 16, axis=1)
    volume = np.repeat(volume, 2, axis=2)
    out = apply_shift(volume, replace(NONE, kspace_fraction=0.5), np.random.default_rng(0))
    profile = out[:, 5, 0]
    # overshoot above the bright level, undershoot below the dark one (Gibbs: ~9 % of the
    # jump for a continuous cut-off, ~7 % on this grid), alternating along the profile
    assert profile[32:38].max() > 0.9 + 0.05 * 0.6
    assert profile[26:32].min() < 0.3 - 0.05 * 0.6
    ripple = np.sign(profile[33:47] - 0.9)
    assert np.count_nonzero(np.diff(ripple)) >= 4
    # a truncation along the edge's own axis only: every column is the same profile
    assert np.allclose(out[:, :, 0], profile[:, None], atol=1e-5)


# ------------------------------------------------------------------------- Rician noise


def test_rician_noise_raises_low_signal_unlike_gaussian():
    # half the volume bright (1.0: the robust maximum), half dark (0.1)
    volume = np.where(np.arange(64)[:, None, None] < 32, 1.0, 0.1) * np.ones((64, 64, 4))
    dark = volume == 0.1
    sigma = 0.05
    rician = apply_shift(volume, replace(NONE, rician_std=sigma), np.random.default_rng(0))
    # a magnitude of signal + complex noise is Rician: its mean exceeds the signal
    expected = stats.rice(0.1 / sigma, scale=sigma).mean()
    assert expected > 0.11
    assert rician[dark].mean() == pytest.approx(expected, rel=0.02)
    assert rician[~dark].mean() == pytest.approx(1.0, abs=0.005)
    # site-b's additive Gaussian noise of the same std leaves the dark mean where it was
    noise_std = sigma / float(volume.std())
    gaussian = apply_shift(volume, replace(NONE, noise_std=noise_std), np.random.default_rng(0))
    assert float((gaussian - volume)[dark].std()) == pytest.approx(sigma, rel=0.05)
    assert gaussian[dark].mean() == pytest.approx(0.1, abs=0.002)
    # white, unlike site-b's noise drawn on a coarser grid
    n = rician[~dark] - rician[~dark].mean()
    assert abs(float((n[1:] * n[:-1]).mean() / (n * n).mean())) < 0.05


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "fields, shown",
    [
        ({"remap_peak": -0.1}, "remap_peak must be a number >= 0, not -0.1"),
        ({"rician_std": float("nan")}, "rician_std must be a number >= 0, not nan"),
        ({"kspace_fraction": 0.0}, "kspace_fraction must be in (0, 1], not 0.0"),
        ({"kspace_fraction": 1.5}, "kspace_fraction must be in (0, 1], not 1.5"),
        ({"ghost_phase": 4.0}, "ghost_phase must be in [0, pi], not 4.0"),
        ({"ghost_period": 1}, "ghost_period must be an integer >= 2, not 1"),
        ({"ghost_period": 2.5}, "ghost_period must be an integer >= 2, not 2.5"),
    ],
)
def test_invalid_new_fields_are_refused(fields, shown):
    with pytest.raises(ValueError, match=re.escape(shown)):
        AcquisitionShift(**fields)


# ------------------------------------------------------------------ the embedded dataset


def small_template(shape=(24, 28, 40)):
    """A stand-in for the MNI152 template: an elliptic head (white core, grey ring, fluid
    rim with its own texture) in a zero background, 1 mm voxels, nilearn's origin."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    r = np.repeat(np.sqrt(x**2 + y**2)[:, :, None], shape[2], axis=2)
    labels = np.where(r < 0.45, 2, np.where(r < 0.75, 1, 0)).astype(np.uint8)
    level = np.select([r < 0.45, r < 0.75, r < 0.9], [0.9, 0.7, 0.4], 0.0)
    texture = np.random.default_rng(4).uniform(-0.05, 0.05, shape)
    image = np.where(level > 0, level + texture, 0.0).astype(np.float32)
    probs = np.stack([labels == k for k in range(3)]).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 3] = (-98.0, -134.0, -72.0)
    return builtin._Template(image, labels, probs, affine)


def _array(path):
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def test_site_c_dataset_matches_the_source_but_its_images(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(builtin, "_mni152_template", small_template)
    src, out = tmp_path / "mni", tmp_path / "site-c"
    build("mni152-tissue", src)
    assert main(["datasets", "build", "mni152-tissue-site-c", "--out", str(out)]) == 0
    assert verify_dataset(out) == []
    src_meta = json.loads((src / "dataset.json").read_text())
    meta = json.loads((out / "dataset.json").read_text())
    extra = meta["medflow"]
    assert extra["builtin"] == "mni152-tissue-site-c" and extra["site"] == "site-c"
    assert extra["simulated_shift"] == SITES["site-c"].to_dict()
    assert "site-c" in meta["description"] and "Rician" in meta["description"]
    assert extra["split"] == src_meta["medflow"]["split"] and meta["labels"] == src_meta["labels"]
    spec, src_spec = load_dataset(out), load_dataset(src)
    for case, src_case in zip(spec.training + spec.test, src_spec.training + src_spec.test):
        assert case.case_id == src_case.case_id
        assert np.array_equal(_array(case.label), _array(src_case.label))
        image, src_image = _array(case.images[0]), _array(src_case.images[0])
        assert np.array_equal(image != 0, src_image != 0)
        assert np.abs(image - src_image)[src_image != 0].mean() > 0.05
    # the slabs' shift is site-c seeded by the slab index, as for mni152-tissue-shifted
    first = builtin._mni152_cut(12, 2, 3, 2, small_template())[0]
    expected = apply_shift(first.image, SITES["site-c"], np.random.default_rng(0))
    assert np.array_equal(_array(out / "imagesTr" / f"{first.case}_0000.nii.gz"), expected)
    chosen = json.loads((out / "references" / builtin.REFERENCE_SLICES).read_text())
    assert sorted(chosen["slices"]) == [f"ref_{i:02d}_0000.nii.gz" for i in range(10)]
    assert [r["file"] for r in extra["references"]] == [
        f"references/{name}" for name in sorted(chosen["slices"])
    ]
    capsys.readouterr()
    assert main(["datasets", "list"]) == 0
    assert "mni152-tissue-site-c" in capsys.readouterr().out


def test_unknown_site_is_refused(tmp_path):
    with pytest.raises(MedflowError, match="unknown site 'site-z'; choose one of site-b, site-c"):
        builtin.build_mni152_tissue_shifted(tmp_path / "x", site="site-z")
