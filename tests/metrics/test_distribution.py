"""Squared MMD and the Fréchet distance: hand-computed cases, closed forms, gradients, shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from medflow.metrics.distribution import MEDIAN_MULTIPLES, frechet_distance, median_distance, mmd2


def test_mmd2_by_hand_with_one_reference():
    # x = {0, 1}, y = {0}, one kernel of width 1: k(0, 1) = e^-1/2 = q
    # mean k(x, x) = (2 + 2q) / 4, k(y, y) = 1, mean k(x, y) = (1 + q) / 2
    q = math.exp(-0.5)
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[0.0]])
    assert mmd2(x, y, bandwidths=[1.0]).item() == pytest.approx((1 - q) / 2, rel=1e-6)
    # two widths: the kernels add, so the values add
    q2 = math.exp(-0.5 / 4)
    both = mmd2(x, y, bandwidths=[1.0, 2.0]).item()
    assert both == pytest.approx((1 - q) / 2 + (1 - q2) / 2, rel=1e-6)


def test_mmd2_zero_for_identical_sets_and_symmetric():
    x = torch.randn(12, 5)
    assert abs(mmd2(x, x.clone()).item()) < 1e-5
    assert abs(mmd2(x, x.clone(), bandwidths=[0.5, 3.0]).item()) < 1e-5
    y = torch.randn(7, 5) + 0.5
    assert mmd2(x, y).item() == pytest.approx(mmd2(y, x).item(), rel=1e-5)


def test_mmd2_positive_and_growing_with_the_shift():
    x = torch.randn(32, 4)
    y = torch.randn(32, 4)
    fixed = [mmd2(x + s, y, bandwidths=[1.0, 2.0, 4.0]).item() for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(fixed, fixed[1:])), fixed
    median = [mmd2(x + s, y).item() for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(median, median[1:])), median
    assert median[0] >= -1e-6 and median[1] > 0.01


def test_median_distance_by_hand():
    # pooled points 0, 3, 1: distances 3, 1, 2, median 2
    z = torch.tensor([[0.0], [3.0], [1.0]])
    assert median_distance(z).item() == pytest.approx(2.0)


def test_mmd2_gradient_finite_nonzero_and_width_detached():
    x = (torch.randn(6, 3) + 1.0).requires_grad_(True)
    y = torch.randn(4, 3)
    mmd2(x, y).backward()
    grad = x.grad.clone()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the median width is a constant for autograd: the same gradient as with those widths fixed
    widths = [m * median_distance(torch.cat([x, y])).item() for m in MEDIAN_MULTIPLES]
    x.grad = None
    mmd2(x, y, bandwidths=widths).backward()
    assert torch.allclose(grad, x.grad, rtol=1e-4, atol=1e-6)


def test_mmd2_gradient_moves_x_toward_y():
    # spread clouds: for collapsed points the median width is the gap itself and the MMD
    # does not change with the gap, a property of the median heuristic
    y = torch.randn(6, 2)
    x = (torch.randn(8, 2) + 3.0).requires_grad_(True)
    start = mmd2(x, y).item()
    # plain gradient descent (a torch.optim optimiser's first step costs seconds of imports)
    for _ in range(50):
        (grad,) = torch.autograd.grad(mmd2(x, y), x)
        with torch.no_grad():
            x -= 2.0 * grad
    assert mmd2(x, y).item() < 0.2 * start


def test_mmd2_equal_pooled_points():
    # every pairwise distance 0: the median width falls back to 1 instead of dividing by 0
    x = torch.ones(3, 2)
    assert mmd2(x, torch.ones(1, 2)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("x_shape", "y_shape"), [((4, 3), (4, 2)), ((4,), (4, 3)), ((0, 3), (2, 3)), ((2, 3), (0, 3))]
)
def test_mmd2_bad_shapes(x_shape, y_shape):
    with pytest.raises(ValueError, match="shape"):
        mmd2(torch.zeros(x_shape), torch.zeros(y_shape))


def test_mmd2_bad_bandwidths():
    with pytest.raises(ValueError, match="bandwidths"):
        mmd2(torch.zeros(2, 1), torch.zeros(2, 1), bandwidths=[1.0, 0.0])


def test_frechet_1d_closed_form():
    x = torch.tensor([[0.0], [1.0], [5.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([[3.0], [-1.0], [4.0]], dtype=torch.float64)
    mx, sx = x.mean().item(), x.std().item()
    my, sy = y.mean().item(), y.std().item()
    expected = (mx - my) ** 2 + (sx - sy) ** 2
    assert frechet_distance(x, y, eps=0.0) == pytest.approx(expected, rel=1e-9)


def test_frechet_diagonal_covariances_by_hand():
    # {(a,0), (-a,0), (0,b), (0,-b)} + mu: mean mu, unbiased covariance diag(2a^2/3, 2b^2/3)
    def cross(a, b, mu):
        return torch.tensor([[a, 0.0], [-a, 0.0], [0.0, b], [0.0, -b]], dtype=torch.float64) + mu

    x = cross(1.0, 2.0, torch.tensor([0.0, 1.0]))
    y = cross(3.0, 0.5, torch.tensor([2.0, -1.0]))
    var_x = np.array([2 / 3, 8 / 3])
    var_y = np.array([6.0, 0.5 / 3])
    expected = 4.0 + 4.0 + ((np.sqrt(var_x) - np.sqrt(var_y)) ** 2).sum()
    assert frechet_distance(x, y, eps=0.0) == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_scipy_sqrtm_full_rank():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = rng.normal(size=(150, 5)) @ rng.normal(size=(5, 5)) + 0.3
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(cx @ cy).real
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cx + cy - 2 * root)
    assert frechet_distance(x, y, eps=0.0) == pytest.approx(expected, rel=1e-7)


def test_frechet_identical_sets_and_fewer_samples_than_dimensions():
    x = torch.randn(6, 40)
    assert frechet_distance(x, x.clone()) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(torch.randn(50, 8), torch.randn(50, 8) + 2.0) > 20.0


def test_frechet_singular_covariance_equals_its_subspace_value():
    # 5 samples in a 3-dimensional subspace of R^30: the 30 x 30 covariances have rank <= 3,
    # and an isometric embedding must not change the distance computed in R^3
    rng = np.random.default_rng(1)
    x3 = rng.normal(size=(5, 3))
    y3 = rng.normal(size=(5, 3)) * 2.0 + 1.0
    q, _ = np.linalg.qr(rng.normal(size=(30, 3)))
    small = frechet_distance(x3, y3, eps=0.0)
    big = frechet_distance(x3 @ q.T, y3 @ q.T, eps=0.0)
    assert math.isfinite(big) and big == pytest.approx(small, rel=1e-6)


def test_frechet_bad_input():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="row"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="eps"):
        frechet_distance(torch.zeros(2, 3), torch.zeros(4, 3), eps=-1.0)
