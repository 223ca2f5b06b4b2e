import json

import pytest
import torch

from medflow.models.flow_unet import FlowUNet, FlowUNetConfig
from medflow.models.unet import NetConfig


def _net(**kw):
    return FlowUNet(FlowUNetConfig(**{"state_channels": 2, "channels": (8, 16), **kw}))


def test_shapes_and_zero_field_at_init():
    net = _net(cond_channels=3, vector_dim=4)
    x = torch.randn(2, 2, 16, 12)
    v = net(x, torch.rand(2), torch.randn(2, 3, 16, 12), torch.randn(2, 4))
    assert v.shape == x.shape
    # the output layer starts at zero: an untrained field does not move the state
    assert torch.count_nonzero(v) == 0


def test_every_parameter_learns():
    net = _net(cond_channels=3, vector_dim=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    args = (torch.randn(2, 2, 16, 16), torch.rand(2), torch.randn(2, 3, 16, 16), torch.randn(2, 4))
    for _ in range(2):  # the first step moves the zero head; the second reaches the rest
        opt.zero_grad()
        (net(*args) - 1.0).pow(2).mean().backward()
        opt.step()
    silent = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not silent


def test_condition_and_vector_must_match_the_config():
    net = _net(cond_channels=3)
    x = torch.randn(1, 2, 16, 16)
    with pytest.raises(ValueError, match="cond_channels=3"):
        net(x, torch.rand(1))
    with pytest.raises(ValueError, match="vector_dim=0"):
        net(x, torch.rand(1), torch.randn(1, 3, 16, 16), torch.randn(1, 2))
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.randn(1, 2, 15, 16), torch.rand(1), torch.randn(1, 3, 15, 16))


def test_time_and_vector_change_the_output():
    net = _net(vector_dim=3)
    torch.nn.init.normal_(net.head[-1].weight)
    x = torch.randn(1, 2, 16, 16)
    vec = torch.tensor([[1.0, 0.0, 1.0]])
    base = net(x, torch.tensor([0.2]), None, vec)
    assert not torch.allclose(base, net(x, torch.tensor([0.8]), None, vec))
    assert not torch.allclose(base, net(x, torch.tensor([0.2]), None, torch.zeros(1, 3)))


@pytest.mark.parametrize(
    "make",
    [lambda ch: NetConfig(1, 3, channels=ch), lambda ch: FlowUNetConfig(3, channels=ch)],
    ids=["NetConfig", "FlowUNetConfig"],
)
def test_both_backbone_configs_check_levels_and_round_trip(make):
    cfg = make([8, "16", 32])  # JSON or CLI values: stored as a tuple of ints
    assert cfg.channels == (8, 16, 32) and cfg.size_multiple == 4
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="at least two resolution levels"):
        make((8,))
