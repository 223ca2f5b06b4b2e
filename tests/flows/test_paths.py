import pytest
import torch

from medflow.flows.paths import LinearPath, sample_time


def test_path_endpoints_and_target():
    x0, x1 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    path = LinearPath()
    at0 = path.sample(x0, x1, torch.zeros(3))
    at1 = path.sample(x0, x1, torch.ones(3))
    assert torch.equal(at0.x_t, x0)
    assert torch.equal(at1.x_t, x1)
    assert torch.equal(at0.dx_t, x1 - x0)


def test_path_is_linear_per_sample():
    x0, x1 = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    t = torch.tensor([0.25, 0.8])
    xt = LinearPath().sample(x0, x1, t).x_t
    assert torch.allclose(xt[0], 0.75 * x0[0] + 0.25 * x1[0])
    assert torch.allclose(xt[1], 0.2 * x0[1] + 0.8 * x1[1])


def test_target_is_time_derivative_of_path():
    x0, x1 = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    path, t, h = LinearPath(), torch.tensor([0.4]), 1e-3
    fd = (path.sample(x0, x1, t + h).x_t - path.sample(x0, x1, t - h).x_t) / (2 * h)
    assert torch.allclose(fd, path.sample(x0, x1, t).dx_t, atol=1e-3)


def test_velocity_from_true_endpoint_equals_target():
    # (x1 - x_t) / (1 - t) recovers x1 - x0 exactly on the straight path
    x0, x1 = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0.0, 0.3, 0.6, 0.9])
    s = LinearPath().sample(x0, x1, t)
    v = LinearPath.velocity_from_endpoint(x1, s.x_t, t, min_gap=0.05)
    assert torch.allclose(v, s.dx_t, atol=1e-5)


def test_time_shape_is_checked():
    with pytest.raises(ValueError, match="t must have shape"):
        LinearPath().sample(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.zeros(3))


def test_time_schedules_range_and_bias():
    g = torch.Generator().manual_seed(0)
    u = sample_time(20000, "uniform", generator=g)
    ln = sample_time(20000, "logit_normal", loc=-1.0, generator=g)
    for t in (u, ln):
        assert t.min() >= 0 and t.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    # a negative location moves mass towards the noise end; the median is sigmoid(loc)
    assert abs(ln.median().item() - torch.sigmoid(torch.tensor(-1.0)).item()) < 0.01
    with pytest.raises(ValueError, match="unknown time schedule"):
        sample_time(2, "cosine")
