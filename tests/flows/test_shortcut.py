"""Shortcut jumps: the draw of (t, d), the self-consistency target on analytic fields, the
endpoint loss, and the network's step input."""

import pytest
import torch

from medflow.flows.parameterization import FlowField
from medflow.flows.shortcut import (
    ShortcutDraw,
    check_max_steps,
    consistency_target,
    sample_jumps,
    shortcut_loss,
)
from medflow.models.unet import NetConfig, SegNet
from medflow.segmentation.inference import flow_probs


def test_jumps_lie_on_their_grid_and_end_by_t_equal_one():
    draw = sample_jumps(4000, 8, torch.Generator().manual_seed(0))
    assert set(draw.d.unique().tolist()) == {0.25, 0.5, 1.0}
    assert torch.all(draw.t + draw.d <= 1.0 + 1e-6)
    assert torch.allclose(torch.remainder(draw.t / draw.d, 1.0), torch.zeros(4000))
    # d = 1 starts from noise only, and every level is drawn about equally often
    assert torch.all(draw.t[draw.d == 1.0] == 0)
    counts = torch.stack([(draw.d == v).sum() for v in (0.25, 0.5, 1.0)]).float() / 4000
    assert torch.all((counts - 1 / 3).abs() < 0.04)


@pytest.mark.parametrize("bad", [1, 3, 6, 0])
def test_max_steps_must_be_a_power_of_two(bad):
    with pytest.raises(ValueError, match="power of 2"):
        check_max_steps(bad)


def test_target_is_the_exact_average_of_a_field_linear_in_time():
    # v = a t, queried with d returns its exact average over [t, t + d] (at d = 0: a t).
    # Above the smallest level the two half-jumps reproduce the average over [t, t + 2e]
    # exactly, a (t + e); at the smallest level they are two Euler steps of the
    # instantaneous field, a (t + e / 2): the one-step sample distils the M-step Euler ODE
    a = 3.0

    def velocity(x, t, d):
        return (a * (t + d / 2)).view(-1, 1, 1, 1).expand_as(x)

    x = torch.zeros(3, 2, 4, 4)
    draw = ShortcutDraw(t=torch.tensor([0.0, 0.25, 0.5]), d=torch.tensor([1.0, 0.5, 0.25]))
    target = consistency_target(velocity, x, draw, max_steps=8)
    exact = a * (draw.t + draw.d / 2)
    euler_two_steps = a * (draw.t + draw.d / 4)
    assert torch.allclose(target[:2, 0, 0, 0], exact[:2], atol=1e-6)
    assert torch.allclose(target[2, 0, 0, 0], euler_two_steps[2], atol=1e-6)


def test_smallest_level_queries_the_instantaneous_field():
    seen = []

    def velocity(x, t, d):
        seen.append(d.clone())
        return torch.zeros_like(x)

    draw = ShortcutDraw(t=torch.tensor([0.0, 0.0]), d=torch.tensor([0.25, 1.0]))
    consistency_target(velocity, torch.zeros(2, 1, 2, 2), draw, max_steps=8)
    assert all(torch.equal(d, torch.tensor([0.0, 0.5])) for d in seen)


def test_target_of_a_single_data_point_is_its_straight_velocity():
    # one mask x1: the ODE's trajectories are straight lines, every jump's average velocity
    # equals the instantaneous one, (x1 - x_t) / (1 - t), and so must the target
    x1 = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1).expand(4, 2, 3, 3)

    def velocity(x, t, d):
        return (x1 - x) / (1 - t).view(-1, 1, 1, 1)

    x_t = torch.randn(4, 2, 3, 3)
    draw = ShortcutDraw(
        t=torch.tensor([0.0, 0.25, 0.5, 0.5]), d=torch.tensor([1.0, 0.5, 0.5, 0.25])
    )
    target = consistency_target(velocity, x_t, draw, max_steps=8)
    assert torch.allclose(target, velocity(x_t, draw.t, draw.d), atol=1e-5)


def test_loss_is_zero_at_the_target_endpoint_and_positive_elsewhere():
    # logits whose endpoint 2 softmax - 1 is the one-hot (1, -1): target = that endpoint
    x_t, t = torch.randn(2, 2, 3, 3), torch.tensor([0.0, 0.5])
    end = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1).expand(2, 2, 3, 3)
    v = (end - x_t) / (1 - t).view(-1, 1, 1, 1)
    sharp = torch.tensor([30.0, -30.0]).view(1, 2, 1, 1).expand(2, 2, 3, 3)
    assert shortcut_loss(sharp, x_t, t, v).item() < 1e-10
    assert shortcut_loss(-sharp, x_t, t, v).item() == pytest.approx(4.0, rel=1e-4)


def test_step_input_changes_the_output_and_zero_is_the_default():
    net = SegNet(NetConfig(1, 3, channels=(8, 16), step_input=True)).eval()
    x, t, img = torch.randn(2, 3, 8, 8), torch.zeros(2), torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        base = net(x, t, img)
        assert torch.equal(base, net(x, t, img, step=torch.zeros(2)))
        assert not torch.allclose(base, net(x, t, img, step=torch.ones(2)))
    plain = SegNet(NetConfig(1, 3, channels=(8, 16)))
    with pytest.raises(ValueError, match="no step input"):
        plain(x, t, img, step=torch.ones(2))
    with pytest.raises(ValueError, match="needs a flow network"):
        NetConfig(1, 3, channels=(8, 16), flow=False, step_input=True)


def test_a_checkpointed_config_without_the_field_loads_with_it_off():
    d = NetConfig(1, 3, channels=(8, 16)).to_dict()
    d.pop("step_input")
    assert NetConfig.from_dict(d).step_input is False


class _Counting(SegNet):
    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        return super().forward(*args, **kwargs)


def test_one_shortcut_sample_is_one_network_call_with_jump_one():
    net = _Counting(NetConfig(1, 3, channels=(8, 16), step_input=True)).eval()
    images = torch.randn(5, 1, 8, 8)
    _Counting.calls = 0
    probs = flow_probs(net, images, sampler="shortcut", steps=1, samples=1)
    assert _Counting.calls == 1 and probs.shape == (5, 3, 8, 8)
    # and it is the endpoint of one jump of size 1 from the seed's noise
    noise = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    field = FlowField(net, step=1.0)
    with torch.no_grad():
        end = noise + field(noise, torch.zeros(5), field.condition(images))
    assert torch.allclose(
        probs,
        ((end + 1) / 2).clamp_min(0) / ((end + 1) / 2).clamp_min(0).sum(1, keepdim=True),
        atol=1e-5,
    )
    _Counting.calls = 0
    flow_probs(net, images, sampler="shortcut", steps=4, samples=3)
    assert _Counting.calls == 12


def test_shortcut_sampler_needs_a_model_with_a_step_input():
    from medflow.errors import OptionError
    from medflow.segmentation.config import TrainConfig
    from medflow.segmentation.inference import SamplingOptions
    from medflow.segmentation.methods import method_for

    net = SegNet(NetConfig(1, 3, channels=(8, 16)))
    with pytest.raises(ValueError, match="no step input"):
        flow_probs(net, torch.randn(1, 1, 8, 8), sampler="shortcut")
    # a method refuses it before any network runs
    with pytest.raises(OptionError, match="shortcut jumps"):
        method_for(TrainConfig(shortcut_fraction=0)).resolve(SamplingOptions(sampler="shortcut"))
