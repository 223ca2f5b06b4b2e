"""Counted inference cost: network calls per sampler, and FLOPs that add up step by step."""

import pytest
import torch

from medflow.models.unet import NetConfig, SegNet, count_parameters
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.cost import inference_cost
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
