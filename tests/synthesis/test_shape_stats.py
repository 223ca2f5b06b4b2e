"""Shape statistics on hand-made masks: a disk, a ring and speckle are told apart."""

import numpy as np
import pytest
import torch

from medflow.synthesis.shape_stats import STATS, boundary_length, relative_to, shape_statistics


def _disk(radius: float, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    return yy**2 + xx**2 <= radius**2


def _set(region: np.ndarray, n: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.repeat(region[None].astype(np.uint8), n, axis=0))


def test_boundary_length_counts_pixel_edges():
    square = np.zeros((8, 8), dtype=bool)
    square[2:5, 2:5] = True
    assert boundary_length(square) == 12
    one = np.zeros((5, 5), dtype=bool)
    one[2, 2] = True
    assert boundary_length(one) == 4
    # the slice's border counts as outside
    assert boundary_length(np.ones((4, 6), dtype=bool)) == 2 * (4 + 6)


def test_disk_ring_and_speckle_are_ordered():
    disk = _disk(12)
    ring = _disk(14) & ~_disk(10)
    rng = np.random.default_rng(0)
    speckle = np.zeros((48, 48), dtype=bool)
    speckle[::3, ::3] = rng.random((16, 16)) < 0.9  # isolated pixels three apart
    stats = {
        name: shape_statistics(_set(region), 2)["1"]
        for name, region in (("disk", disk), ("ring", ring), ("speckle", speckle))
    }
    b = {k: v["boundary_per_area"] for k, v in stats.items()}
    assert b["disk"] < b["ring"] < b["speckle"] == pytest.approx(4.0)
    # a digital disk of radius r: boundary about 8 r, area about pi r^2
    assert b["disk"] == pytest.approx(8 / (np.pi * 12), rel=0.1)
    assert stats["disk"]["components_mean"] == stats["ring"]["components_mean"] == 1.0
    assert stats["speckle"]["components_mean"] == speckle.sum()
    assert stats["disk"]["small_fraction"] == stats["ring"]["small_fraction"] == 0.0
    assert stats["speckle"]["small_fraction"] == 1.0


def test_areas_presence_and_classes():
    masks = torch.zeros(4, 10, 10, dtype=torch.uint8)
    masks[0, :5] = 1  # class 1: 50 % of map 0, 20 % of map 1, absent from maps 2 and 3
    masks[1, :2] = 1
    masks[:, 8:, 8:] = 2  # class 2: 4 % of every map
    stats = shape_statistics(masks, 3)
    assert set(stats) == {"1", "2"} and all(set(s) == set(STATS) for s in stats.values())
    areas = np.array([0.5, 0.2, 0.0, 0.0])
    assert stats["1"]["area_mean"] == pytest.approx(areas.mean())
    assert stats["1"]["area_std"] == pytest.approx(areas.std(ddof=1))
    assert stats["1"]["present"] == 0.5 and stats["2"]["present"] == 1.0
    assert stats["2"]["area_std"] == 0.0
    # class 2's 2 x 2 corners: 4 pixels each, below the default small size of 8
    assert stats["2"]["small_fraction"] == 1.0
    assert shape_statistics(masks, 3, small=4)["2"]["small_fraction"] == 0.0
    rel = relative_to(stats, stats)
    assert rel["1"]["area_mean"] == 1.0 and np.isnan(rel["2"]["area_std"])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        shape_statistics(masks[0], 3)
