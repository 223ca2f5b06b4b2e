"""Counted inference cost: network calls per sampler, FLOPs that add up step by step, and
FFTs counted by the benchFFT convention."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from medflow.models.unet import NetConfig, SegNet, count_parameters
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.cost import flop_counter, inference_cost
from medflow.segmentation.inference import SamplingOptions as Opts
from medflow.segmentation.methods import Diffusion, MedFlowSeg, UNet

FLOW, UNET = MedFlowSeg(TrainConfig(shortcut_fraction=0)), UNet(TrainConfig(model="unet"))

SIZE = 16


def _net(**kw) -> SegNet:
    torch.manual_seed(0)
    return SegNet(NetConfig(in_channels=1, num_classes=3, channels=(8, 16), **kw))


@pytest.mark.parametrize(
    ("sampler", "steps", "samples", "calls"),
    [("euler", 1, 1, 1), ("euler", 4, 1, 4), ("heun", 3, 1, 5), ("euler", 2, 3, 6)],
)
def test_flow_calls_are_samples_times_the_samplers_calls(sampler, steps, samples, calls):
    cost = inference_cost(FLOW, _net(), SIZE, Opts(steps=steps, sampler=sampler, samples=samples))
    assert cost.evaluations == calls


def test_diffusion_calls_one_network_per_step():
    diffusion = Diffusion(TrainConfig(model="diffusion"))
    cost = inference_cost(diffusion, _net(), SIZE, Opts(steps=10, sampler="ddim"))
    assert cost.evaluations == 10


def test_a_unet_is_one_call_whatever_the_options():
    net = _net(flow=False)
    one = inference_cost(UNET, net, SIZE)
    assert one.evaluations == 1 and one.parameters == count_parameters(net)
    assert inference_cost(UNET, net, SIZE, Opts(samples=5)).gflops == one.gflops


def test_flops_grow_by_one_trunk_per_step_and_count_the_image_features_once():
    net = _net()
    g = [inference_cost(FLOW, net, SIZE, Opts(steps=n)).gflops for n in (1, 2, 3, 5)]
    per_step = g[1] - g[0]
    assert per_step > 0
    assert g[2] - g[1] == pytest.approx(per_step, rel=1e-9)
    assert g[3] - g[0] == pytest.approx(4 * per_step, rel=1e-9)
    # the image branch runs once per slice, not once per step
    assert g[0] > per_step
    plain = _net(image_branch=False, dbsa=False, faa=False)
    p = [inference_cost(FLOW, plain, SIZE, Opts(steps=n)).gflops for n in (1, 2)]
    assert p[1] == pytest.approx(2 * p[0], rel=1e-9)


def test_flops_scale_with_the_slice_area():
    net = _net(flow=False)
    big, small = inference_cost(UNET, net, 32), inference_cost(UNET, net, 16)
    assert big.gflops == pytest.approx(4 * small.gflops)


def _flops(fn) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def test_ffts_cost_2_5_n_log2_n_per_real_plane_and_5_n_log2_n_per_complex_plane():
    x = torch.randn(2, 3, 8, 16)  # 6 planes of N = 128 points, log2 N = 7
    spectrum = torch.fft.rfft2(x, norm="ortho")
    assert _flops(lambda: torch.fft.rfft2(x, norm="ortho")) == 2.5 * 6 * 128 * 7 == 13440
    # the inverse is sized by its real output, the same 6 planes of 128 points
    assert _flops(lambda: torch.fft.irfft2(spectrum, s=(8, 16), norm="ortho")) == 13440
    assert _flops(lambda: torch.fft.fft2(x.to(torch.complex64))) == 5 * 6 * 128 * 7
    # one dimension: 48 rows of 16 points; a length that is no power of two
    assert _flops(lambda: torch.fft.rfft(x, dim=-1)) == 2.5 * 48 * 16 * 4
    odd = torch.randn(1, 1, 5, 6)
    assert _flops(lambda: torch.fft.rfft2(odd)) == round(2.5 * 30 * math.log2(30))


def _uncounted_ffts(method, net, options) -> int:
    """FLOPs of the prediction path by torch's own formulas alone (no FFTs)."""
    with FlopCounterMode(display=False) as counter:
        method.probs(net, torch.zeros(1, 1, SIZE, SIZE), options)
    return counter.get_total_flops()


@pytest.mark.parametrize("steps", [1, 3])
def test_faa_adds_exactly_its_three_ffts_per_network_call(steps):
    options = Opts(steps=steps, sampler="euler")
    with_faa, without = _net(), _net(faa=False)
    # FAA at the 8 x 8 bottleneck of 16 channels: rfft2 of h and of g, irfft2 of the mix
    per_call = 3 * 2.5 * 16 * (8 * 8) * math.log2(8 * 8)
    added = inference_cost(FLOW, with_faa, SIZE, options).gflops * 1e9 - _uncounted_ffts(
        FLOW, with_faa, options
    )
    assert added == pytest.approx(steps * per_call, abs=1e-3)
    no_fft = inference_cost(FLOW, without, SIZE, options).gflops * 1e9
    assert no_fft == pytest.approx(_uncounted_ffts(FLOW, without, options), abs=1e-3)
