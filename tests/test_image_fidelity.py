"""benchmarks/image_fidelity.py's measures: distances that separate a changed image set from
the reference and not a same-distribution one, band energies that see blur and noise, and
the train-on-synthetic summary's pairing with the real arm."""

import pytest
import torch
import torch.nn.functional as F
from conftest import benchmark_module


@pytest.fixture(scope="module")
def fidelity():
    yield from benchmark_module("image_fidelity.py", "image_fidelity")


def heads(n: int, seed: int) -> torch.Tensor:
    """``(n, 1, 32, 32)`` textured discs on a background at -2 (a z-scored head)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    radius = 8 + 6 * torch.rand(n, 1, 1, 1, generator=gen)
    disc = ((yy - 16) ** 2 + (xx - 16) ** 2).sqrt() < radius
    texture = torch.randn(n, 1, 32, 32, generator=gen)
    texture = F.avg_pool2d(texture, 3, 1, 1) * 2
    return torch.where(disc, texture, torch.full_like(texture, -2.0))


def test_distances_separate_a_blurred_set_and_not_a_fresh_draw(fidelity):
    ref = heads(48, 0)
    background = ref.amin()
    fresh = heads(48, 1)
    blurred = torch.where(fresh > -2, F.avg_pool2d(fresh, 5, 1, 2), fresh)
    noisy = torch.where(fresh > -2, fresh + 0.8 * torch.randn_like(fresh), fresh)
    out = fidelity.group_distances(
        {"fresh": fresh, "blurred": blurred, "noisy": noisy}, ref, float(background)
    )
    # lowfreq is made for a smooth gain and is blind to blur: not asked here
    for group in ("moments", "histogram", "style", "laplacian", "all five"):
        assert 3 * out["fresh"][group]["mmd2"] < out["blurred"][group]["mmd2"], group
        assert 3 * out["fresh"][group]["mmd2"] < out["noisy"][group]["mmd2"], group
    finest = {name: out[name]["laplacian_log_energy"][0] for name in ("fresh", "blurred", "noisy")}
    reference = out["source test (reference)"]["laplacian_log_energy"][0]
    assert finest["blurred"] < reference - 0.5 < finest["fresh"] < reference + 0.5
    assert finest["noisy"] > reference + 0.5


def test_summary_pairs_every_arm_with_the_real_one_by_seed(fidelity):
    rows = [
        {"condition": c, "seed": s, "foreground": {"dice": d}}
        for c, s, d in [
            ("real", 0, 0.80),
            ("real", 1, 0.70),
            ("stage 1, 20 steps", 0, 0.60),
            ("stage 1, 20 steps", 1, 0.65),
        ]
    ]
    out = fidelity.summary(rows)
    assert out["real"]["minus_real"] == 0
    assert out["stage 1, 20 steps"]["dice"] == pytest.approx(62.5)
    assert out["stage 1, 20 steps"]["minus_real"] == pytest.approx(-12.5)  # (-20 - 5) / 2
    assert out["stage 1, 20 steps"]["dice_values"] == pytest.approx([60.0, 65.0])
