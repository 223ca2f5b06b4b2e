import numpy as np
import pytest

from medflow.data.shift import SITES, AcquisitionShift, apply_shift
from medflow.data.transforms import Preprocessing, normalise

NONE = dict(gamma=1.0, bias_strength=0.0, noise_std=0.0, downsample=1)
ZSCORE = Preprocessing(schemes=("zscore",), slice_axis=2, size=(16, 16))


@pytest.fixture
def phantom():
    """A skull-stripped "head" (48 x 56 x 6): an elliptic white-matter core (0.8) in a grey-
    matter ring (0.5) in a ring of cerebrospinal fluid (0.2), with fine texture, in an
    exactly-zero background; returns ``(volume, labels)`` with labels 1 = grey, 2 = white
    (fluid and background 0, as in ``mni152-tissue``). Three tissues, because any monotone
    map of a two-level image is affine on its two levels, which a z-score undoes."""
    x, y = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 56), indexing="ij")
    r = np.sqrt((x / 0.8) ** 2 + (y / 0.9) ** 2)
    r = np.repeat(r[:, :, None], 6, axis=2)
    labels = np.where(r < 0.5, 2, np.where(r < 0.8, 1, 0)).astype(np.uint8)
    level = np.select([r < 0.5, r < 0.8, r < 0.95], [0.8, 0.5, 0.2], 0.0)
    texture = np.random.default_rng(123).uniform(-0.1, 0.1, r.shape)
    return np.where(level > 0, level + texture, 0.0).astype(np.float32), labels


def _zscored(volume):
    return normalise(volume[None], ZSCORE)[0]


def _contrast(volume, labels):
    """White minus grey matter mean after medflow's per-image z-score."""
    z = _zscored(volume)
    return float(z[labels == 2].mean() - z[labels == 1].mean())


def _high_frequency_fraction(volume):
    """Share of in-plane spectral power above a quarter cycle per voxel (the Nyquist limit of
    a grid twice as coarse)."""
    power = np.abs(np.fft.fft2(volume, axes=(0, 1))) ** 2
    fx = np.fft.fftfreq(volume.shape[0])[:, None, None]
    fy = np.fft.fftfreq(volume.shape[1])[None, :, None]
    high = np.broadcast_to((np.abs(fx) > 0.25) | (np.abs(fy) > 0.25), power.shape)
    return float(power[high].sum() / power.sum())


def test_shift_stays_inside_the_head(phantom):
    volume, _ = phantom
    out = apply_shift(volume, SITES["site-b"], np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == volume.shape
    assert np.all(out[volume == 0] == 0)
    # head voxels stay nonzero, so the crop box and the z-score's voxels are the source's
    assert np.all(out[volume != 0] > 0)
    assert not np.allclose(out[volume != 0], volume[volume != 0], rtol=0.05)


def test_same_seed_same_output_other_seed_other_output(phantom):
    volume, _ = phantom
    shift = SITES["site-b"]
    a = apply_shift(volume, shift, np.random.default_rng(7))
    b = apply_shift(volume, shift, np.random.default_rng(7))
    c = apply_shift(volume, shift, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0.05


def test_no_shift_is_the_identity(phantom):
    volume, _ = phantom
    out = apply_shift(volume, AcquisitionShift(**NONE), np.random.default_rng(0))
    np.testing.assert_allclose(out, volume, rtol=1e-6)


def test_gamma_survives_zscore_a_linear_gain_does_not(phantom):
    volume, labels = phantom
    before = _contrast(volume, labels)
    # a global gain is what a z-score removes: the normalised image does not change
    np.testing.assert_allclose(_zscored(3.0 * volume), _zscored(volume), atol=1e-5)
    for gamma, sign in ((0.5, -1), (2.0, 1)):
        out = apply_shift(
            volume, AcquisitionShift(**{**NONE, "gamma": gamma}), np.random.default_rng(0)
        )
        assert sign * (_contrast(out, labels) - before) > 0.1


def test_bias_field_is_smooth_with_the_stated_amplitude(phantom):
    volume, labels = phantom
    shift = AcquisitionShift(**{**NONE, "bias_strength": 0.3})
    out = apply_shift(volume, shift, np.random.default_rng(3))
    head = volume != 0
    log_field = np.where(head, np.log(np.where(head, out, 1) / np.where(head, volume, 1)), 0)
    assert np.abs(log_field[head]).max() == pytest.approx(0.3, abs=1e-5)
    # smooth: neighbouring head voxels differ by a small fraction of the amplitude
    step = np.abs(np.diff(log_field, axis=0))[head[1:] & head[:-1]]
    assert step.max() < 0.05
    # a gain that varies in space is no global gain: it survives the z-score
    assert np.abs(_zscored(out) - _zscored(volume))[head].max() > 0.2


@pytest.mark.parametrize("fields", [{"downsample": 2}, {"blur_sigma": 1.0}])
def test_lower_resolution_removes_high_frequencies(phantom, fields):
    volume, _ = phantom
    out = apply_shift(volume, AcquisitionShift(**{**NONE, **fields}), np.random.default_rng(0))
    assert _high_frequency_fraction(out) < 0.3 * _high_frequency_fraction(volume)
    # averaging keeps the head's mean intensity (up to its rim, mixed with background)
    head = volume != 0
    assert out[head].mean() == pytest.approx(volume[head].mean(), rel=0.05)


@pytest.mark.parametrize("downsample", [1, 2])
def test_noise_std_sets_the_residual_std(phantom, downsample):
    volume, _ = phantom
    head = volume != 0
    clean = apply_shift(
        volume, AcquisitionShift(**{**NONE, "downsample": downsample}), np.random.default_rng(0)
    )
    measured = []
    for noise_std in (0.05, 0.1):
        shift = AcquisitionShift(**{**NONE, "downsample": downsample, "noise_std": noise_std})
        noisy = apply_shift(volume, shift, np.random.default_rng(0))
        measured.append(float((noisy - clean)[head].std()) / float(clean[head].std()))
    assert measured[0] == pytest.approx(0.05, rel=0.02)
    assert measured[1] == pytest.approx(0.1, rel=0.02)


def test_noise_on_a_coarse_grid_is_correlated(phantom):
    volume, _ = phantom
    head = volume != 0
    lag1 = []
    for downsample in (1, 2):
        fields = {**NONE, "downsample": downsample}
        clean = apply_shift(volume, AcquisitionShift(**fields), np.random.default_rng(0))
        noisy = apply_shift(
            volume, AcquisitionShift(**{**fields, "noise_std": 0.1}), np.random.default_rng(0)
        )
        n = np.where(head, noisy - clean, 0)
        lag1.append(float((n[1:] * n[:-1]).sum() / (n * n).sum()))
    assert abs(lag1[0]) < 0.1 and lag1[1] > 0.4


@pytest.mark.parametrize(
    "fields, shown",
    [
        ({"gamma": 0.0}, "gamma must be a positive number, not 0.0"),
        ({"gamma": float("nan")}, "not nan"),
        ({"bias_strength": -0.1}, "bias_strength must be a number >= 0, not -0.1"),
        ({"noise_std": float("inf")}, "noise_std must be a number >= 0, not inf"),
        ({"blur_sigma": -1.0}, "blur_sigma must be a number >= 0, not -1.0"),
        ({"downsample": 0}, "downsample must be an integer >= 1, not 0"),
        ({"downsample": 1.5}, "downsample must be an integer >= 1, not 1.5"),
        ({"bias_order": 0}, "bias_order must be an integer >= 1, not 0"),
    ],
)
def test_invalid_fields_are_refused(fields, shown):
    with pytest.raises(ValueError, match=shown.replace(".", r"\.")):
        AcquisitionShift(**fields)


def test_invalid_volumes_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"\(X, Y, Z\)"):
        apply_shift(np.ones((4, 4)), SITES["site-b"], rng)
    with pytest.raises(ValueError, match="negative"):
        apply_shift(-np.ones((4, 4, 2)), SITES["site-b"], rng)
    with pytest.raises(ValueError, match="NaN"):
        apply_shift(np.full((4, 4, 2), np.nan), SITES["site-b"], rng)
    assert not apply_shift(np.zeros((4, 4, 2)), SITES["site-b"], rng).any()


def test_site_b_is_the_default_and_round_trips():
    shift = SITES["site-b"]
    assert shift == AcquisitionShift()
    assert AcquisitionShift(**shift.to_dict()) == shift
    assert shift.gamma != 1 and shift.bias_strength > 0 and shift.noise_std > 0
    assert shift.downsample == 2
