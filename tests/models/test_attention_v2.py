"""DBSA v2 and FAA v2 (docs/MODEL.md 6.1, 6.2): shapes at odd and non-square sizes, a DBSA
gate that multiplies the flow features, an FAA gate that knows which frequency a bin is."""

import math

import pytest
import torch

from medflow.models.attention import (
    DualBranchSpatialAttentionV2,
    FrequencyAwareAttention,
    FrequencyAwareAttentionV2,
    frequency_position,
)

SIZES = [(24, 40), (48, 48), (40, 24), (7, 5), (5, 6), (3, 3)]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_both_modules_keep_the_shape_at_any_size(height, width):
    torch.manual_seed(0)
    h, g = torch.randn(2, 8, height, width), torch.randn(2, 8, height, width)
    dbsa, faa = DualBranchSpatialAttentionV2(8), FrequencyAwareAttentionV2(8, time_dim=16)
    for out in (dbsa(h, g), faa(h, g, torch.randn(2, 16))):
        assert out.shape == h.shape and torch.isfinite(out).all()


def test_dbsa_v2_gate_multiplies_the_flow_features():
    torch.manual_seed(0)
    m = DualBranchSpatialAttentionV2(8)
    h, g = torch.randn(2, 8, 24, 40), torch.randn(2, 8, 24, 40)
    a, v = m.structure(g)
    assert a.shape == v.shape == h.shape
    assert a.min() > 0 and a.max() < 1
    # zero flow features leave the image-only term, exactly
    assert torch.equal(m(torch.zeros_like(h), g), v)
    # and the flow features enter multiplied by the gate, which they do not move
    assert torch.allclose(m(h, g) - v, a * h, atol=1e-6)
    assert torch.equal(m.structure(g)[0], a)
    # the gate is no constant: image structure sets it per channel and pixel
    assert a.std() > 0.01
    # a fresh module is close to plain injection h + P(g): the gate starts mostly open
    assert a.mean() > 0.7


def test_dbsa_v2_gate_reads_the_image_at_its_dilations_and_globally():
    torch.manual_seed(0)
    m = DualBranchSpatialAttentionV2(4, dilations=(1, 2, 4))
    g = torch.randn(1, 4, 15, 15)

    def moved(dy: int, dx: int) -> float:
        """How much the gate at the centre moves when ``g`` changes at an offset."""
        poked = g.clone()
        poked[..., 7 + dy, 7 + dx] += 3.0
        return (m.structure(poked)[0] - m.structure(g)[0])[..., 7, 7].abs().max().item()

    far = moved(0, 7)
    assert far > 0  # the global branch: a change anywhere reaches every pixel
    with torch.no_grad():
        m.context.weight.zero_()  # local branch alone
    assert moved(0, 7) == 0
    for reach in (1, 2, 4):  # each dilation's 3x3 taps
        assert moved(0, reach) > 1e-4 and moved(reach, reach) > 1e-4
    assert moved(0, 3) == 0 and moved(3, 0) == 0  # no tap at distance 3


def test_frequency_position_names_the_same_frequency_at_any_size():
    pos = frequency_position(8, 8, bands=4)
    assert pos.shape == (1, 6, 8, 5)
    # bin (1, 1) of an 8 x 8 plane and bin (2, 2) of a 16 x 16 one: both f = (1/8, 1/8)
    assert torch.allclose(pos[..., 1, 1], frequency_position(16, 16, bands=4)[..., 2, 2])
    # radial bumps: the first at DC, the last at the corner (1/2, 1/2), r = 1
    assert pos[0, 0, 0, 0] == 1 and pos[0, 3, 4, 4] == pytest.approx(1.0)
    assert pos[0, 3, 0, 0] < 1e-3 and pos[0, 0, 4, 4] < 1e-3
    # orientation cos 2θ, sin 2θ: 0 at DC, horizontal +1, vertical -1, diagonals ±1
    assert pos[0, 4:, 0, 0].tolist() == [0.0, 0.0]
    assert pos[0, 4, 0, 2] == pytest.approx(1.0) and pos[0, 4, 2, 0] == pytest.approx(-1.0)
    assert pos[0, 5, 1, 1] == pytest.approx(1.0) and pos[0, 5, -1, 1] == pytest.approx(-1.0)
    assert frequency_position(5, 7, bands=3).shape == (1, 5, 5, 4)
    with pytest.raises(ValueError, match="bands"):
        frequency_position(4, 4, bands=1)


@pytest.mark.parametrize(("height", "width"), [(8, 10), (7, 9), (6, 6)])
def test_the_position_is_the_same_at_a_bin_and_its_stored_conjugate(height, width):
    pos = frequency_position(height, width, bands=5)
    # rfft2 stores both (fy, fx) and (-fy, fx) on column 0 and, for an even width, on the
    # Nyquist column; there they are conjugates, so the gate must agree
    flipped = torch.roll(torch.flip(pos, dims=[-2]), 1, dims=-2)  # row k -> row -k
    columns = [0, -1] if width % 2 == 0 else [0]
    for c in columns:
        assert torch.allclose(pos[..., c], flipped[..., c])


def _cosine(height: int, width: int, k: int, channels: int = 4) -> torch.Tensor:
    """A cosine of ``k`` cycles down the rows: all its energy at rfft2 bins (±k, 0)."""
    y = torch.arange(height, dtype=torch.float32)
    wave = torch.cos(2 * math.pi * k * y / height)[:, None].expand(height, width)
    return wave.expand(1, channels, height, width).contiguous()


def _gate(m: FrequencyAwareAttention, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    hf, gf = torch.fft.rfft2(h, norm="ortho"), torch.fft.rfft2(g, norm="ortho")
    return m.spectral_gate(hf, gf, tuple(h.shape[-2:]))


def test_faa_v2_gate_tells_frequencies_apart_where_v1_cannot():
    torch.manual_seed(0)
    v1 = FrequencyAwareAttention(4, time_dim=8)
    torch.manual_seed(0)
    v2 = FrequencyAwareAttentionV2(4, time_dim=8)
    height, width = 16, 12
    zero = torch.zeros(1, 4, height, width)
    # no content at all: v1's gate is one value per channel, v2's varies over frequency
    flat1, flat2 = _gate(v1, zero, zero), _gate(v2, zero, zero)
    assert flat1.std(dim=(-2, -1)).max() < 1e-7
    assert flat2.std(dim=(-2, -1)).min() > 1e-3
    # equal magnitudes at swapped frequencies: a cosine at k = 1 and one at k = 5
    low, high = _cosine(height, width, 1), _cosine(height, width, 5)
    a_low1, a_high1 = _gate(v1, low, zero), _gate(v1, high, zero)
    a_low2, a_high2 = _gate(v2, low, zero), _gate(v2, high, zero)
    # v1 gives each bin the gate of its magnitudes: swapping them swaps the gate
    assert torch.allclose(a_low1[..., 1, 0], a_high1[..., 5, 0], atol=1e-6)
    assert torch.allclose(a_low1[..., 5, 0], a_high1[..., 1, 0], atol=1e-6)
    # v2 knows the bins are different frequencies
    assert (a_low2[..., 1, 0] - a_high2[..., 5, 0]).abs().max() > 1e-2
    assert (a_low2[..., 5, 0] - a_high2[..., 1, 0]).abs().max() > 1e-2


def test_faa_v2_is_faa_when_position_says_nothing():
    torch.manual_seed(0)
    v1 = FrequencyAwareAttention(8, time_dim=16)
    torch.manual_seed(0)
    v2 = FrequencyAwareAttentionV2(8, time_dim=16)  # FAA's own layers drawn first, the same
    # the compiled predictor runs FAA eagerly by its class (engine/runtime.py): v2 too
    assert isinstance(v2, FrequencyAwareAttention)
    h, g, temb = torch.randn(2, 8, 12, 10), torch.randn(2, 8, 12, 10), torch.randn(2, 16)
    assert not torch.allclose(v1(h, g, temb), v2(h, g, temb))
    with torch.no_grad():
        v2.freq_embed[-1].weight.zero_()
        v2.freq_embed[-1].bias.zero_()
    # with no scale and no shift from the position, the rest is FAA's, unchanged
    assert torch.allclose(v1(h, g, temb), v2(h, g, temb), atol=1e-6)


def test_faa_v2_keeps_time_modulation_and_starts_small():
    torch.manual_seed(0)
    m = FrequencyAwareAttentionV2(8, time_dim=16)
    h, g, temb = torch.randn(2, 8, 12, 12), torch.randn(2, 8, 12, 12), torch.randn(2, 16)
    out = m(h, g, temb)
    assert not torch.allclose(out, m(h, g, torch.randn(2, 16)))
    assert (out - h).abs().mean() < 0.5 * h.abs().mean()
