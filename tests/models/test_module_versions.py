"""Choosing DBSA and FAA versions and FAA's levels: the network each config builds, configs
stored before the fields existed, parameter counts, and FAA's FFTs in the counted cost."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from medflow.models.attention import (
    DualBranchSpatialAttention,
    DualBranchSpatialAttentionV2,
    FrequencyAwareAttention,
    FrequencyAwareAttentionV2,
)
from medflow.models.unet import PRE_FIELD_DEFAULTS, NetConfig, SegNet, count_parameters
from medflow.segmentation.bench.config import METHODS, VARIANTS
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.cost import inference_cost
from medflow.segmentation.inference import SamplingOptions
from medflow.segmentation.methods import MedFlowSeg, method_for

TINY = (8, 16, 16)
V2 = {"dbsa_version": 2, "faa_version": 2, "faa_levels": 2}


def _net(**kw) -> SegNet:
    torch.manual_seed(0)
    return SegNet(NetConfig(in_channels=2, num_classes=3, channels=kw.pop("channels", TINY), **kw))


def _modules(net: SegNet, cls: type) -> list:
    return [m for m in net.modules() if type(m) is cls]


@pytest.mark.parametrize(
    "kw", [{}, {"dbsa_version": 2}, {"faa_version": 2}, V2, {"faa_levels": 3, "faa_version": 2}]
)
@pytest.mark.parametrize(("height", "width"), [(24, 40), (48, 48), (16, 12)])
def test_every_version_runs_at_non_square_sizes(kw, height, width):
    net = _net(**kw)
    x, img = torch.randn(2, 3, height, width), torch.randn(2, 2, height, width)
    assert net(x, torch.tensor([0.0, 0.6]), img).shape == (2, 3, height, width)


@pytest.mark.parametrize("kw", [V2, {"faa_levels": 3, "faa_version": 1, "dbsa_version": 2}])
def test_gradients_reach_every_parameter_of_the_new_modules(kw):
    net = _net(**kw)
    x, t, img = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 2, 16, 16)
    net(x, t, img).pow(2).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_the_config_picks_the_modules_and_faa_levels_place_them():
    v1, v2 = _net(), _net(**V2)
    assert len(_modules(v1, DualBranchSpatialAttention)) == 2 and not v1.faa_dec
    assert type(v1.faa) is FrequencyAwareAttention
    assert len(_modules(v2, DualBranchSpatialAttentionV2)) == 2
    assert not _modules(v2, DualBranchSpatialAttention)
    assert not _modules(v2, FrequencyAwareAttention)
    # the bottleneck and the next finer level (level 1 of three: 1/2 of the input)
    assert type(v2.faa) is FrequencyAwareAttentionV2 and list(v2.faa_dec) == ["1"]
    every = _net(faa_levels=3)
    assert set(every.faa_dec) == {"0", "1"}
    assert len(_modules(every, FrequencyAwareAttention)) == 3
    assert not _net(faa=False, faa_levels=3, faa_version=2).faa_dec
    # a finer-level FAA acts: removing it changes the output
    net = _net(faa_levels=2).eval()
    x, t, img = torch.randn(1, 3, 16, 16), torch.zeros(1), torch.randn(1, 2, 16, 16)
    with_it = net(x, t, img)
    net.faa_dec["1"].forward = lambda h, g, temb: h
    assert not torch.allclose(with_it, net(x, t, img))


def test_bad_versions_and_levels_are_refused():
    for kw, match in [
        ({"dbsa_version": 3}, "dbsa_version and faa_version"),
        ({"faa_version": 0}, "dbsa_version and faa_version"),
        ({"faa_levels": 0}, "faa_levels must be in 1..3"),
        ({"faa_levels": 4}, "faa_levels must be in 1..3"),
    ]:
        with pytest.raises(ValueError, match=match):
            NetConfig(in_channels=1, num_classes=2, channels=TINY, **kw)
    with pytest.raises(ValueError, match="faa_levels must be between 1 and the number"):
        TrainConfig(channels=(8, 16), faa_levels=3)
    with pytest.raises(ValueError, match="dbsa_version and faa_version must be 1 or 2"):
        TrainConfig(faa_version=3)


def test_the_published_network_stays_the_default_and_old_configs_read_as_it():
    default = NetConfig(in_channels=2, num_classes=3, channels=TINY)
    assert (default.dbsa_version, default.faa_version, default.faa_levels) == (1, 1, 1)
    stored = default.to_dict()
    for key in PRE_FIELD_DEFAULTS:
        del stored[key]
    # a network stored before the fields existed: today's modules, bit for bit
    old = NetConfig.from_dict(stored)
    assert old == default
    assert NetConfig.from_dict({**stored, **V2}) == NetConfig(2, 3, channels=TINY, **V2)
    x, t, img = torch.randn(1, 3, 24, 40), torch.rand(1), torch.randn(1, 2, 24, 40)
    torch.manual_seed(0)
    a = SegNet(old).eval()
    torch.manual_seed(0)
    b = SegNet(NetConfig(2, 3, channels=TINY, dbsa_version=1, faa_version=1)).eval()
    assert list(a.state_dict()) == list(b.state_dict())
    assert not any(k.startswith("faa_dec") for k in a.state_dict())
    assert torch.equal(a(x, t, img), b(x, t, img))
    # the training config too, and its method builds the network it names
    fields = {k: v for k, v in TrainConfig().to_dict().items() if k not in PRE_FIELD_DEFAULTS}
    cfg = TrainConfig.from_dict(fields)
    assert (cfg.dbsa_version, cfg.faa_version, cfg.faa_levels) == (1, 1, 1)
    net_cfg = method_for(TrainConfig(**V2)).net_config(1, 3)
    assert (net_cfg.dbsa_version, net_cfg.faa_version, net_cfg.faa_levels) == (2, 2, 2)


def test_bench_variants_train_the_versions_their_names_say():
    for name in VARIANTS:
        cfg = TrainConfig(**METHODS[name])
        net = SegNet(method_for(cfg).net_config(1, 3))
        dbsa_v2 = bool(_modules(net, DualBranchSpatialAttentionV2))
        faa_v2 = bool(_modules(net, FrequencyAwareAttentionV2))
        assert (dbsa_v2, faa_v2) == ("dbsa" in name or name == "medflowseg-v2", "dbsa" not in name)
        assert len(net.faa_dec) == (1 if faa_v2 else 0)


def test_parameter_counts_of_the_new_modules():
    c = 64
    # DBSA v2: U and P (C -> 2C), three depthwise 3x3, W_m and the global linear map
    assert count_parameters(DualBranchSpatialAttentionV2(c)) == 4 * c * c + 34 * c
    # the published DBSA: 7x7 depthwise on 4 statistics, 3x3 over 2C, projections
    assert count_parameters(DualBranchSpatialAttention(c)) == 20 * c * c + 3 * c + 200
    # FAA v2 adds its position MLP: (8 bands + 2) -> 32 -> 2C
    added = count_parameters(FrequencyAwareAttentionV2(c, 128)) - count_parameters(
        FrequencyAwareAttention(c, 128)
    )
    assert added == 10 * 32 + 32 + 32 * 2 * c + 2 * c
    # at the default widths the v2 network is the smaller one
    full = dict(in_channels=1, num_classes=3)
    assert count_parameters(SegNet(NetConfig(**full, **V2))) < count_parameters(
        SegNet(NetConfig(**full))
    )


def _fft_flops(planes: int, height: int, width: int) -> float:
    n = height * width
    return 2.5 * planes * n * math.log2(n)


def test_faa_on_two_levels_adds_three_ffts_per_level_to_the_counted_cost():
    method = MedFlowSeg(TrainConfig(shortcut_fraction=0))
    net = _net(channels=(8, 16), **V2)  # 16 x 16 input: 8 x 8 x 16 bottleneck, 16 x 16 x 8
    image = torch.zeros(1, 2, 16, 16)
    options = SamplingOptions(steps=2, sampler="euler")
    with FlopCounterMode(display=False) as plain:  # torch's formulas alone: no FFTs
        method.probs(net, image, options)
    counted = inference_cost(method, net, 16, options).gflops * 1e9
    per_call = 3 * (_fft_flops(16, 8, 8) + _fft_flops(8, 16, 16))
    assert counted - plain.get_total_flops() == pytest.approx(2 * per_call, abs=1e-3)
