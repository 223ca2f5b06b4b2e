"""What one prediction costs, counted rather than timed: parameters, network evaluations and
GFLOPs per slice, for any model and sampler setting.

Counting runs the real prediction path (the method's ``probs``)
on one blank slice under torch's ``FlopCounterMode``, so what the path shares between steps
(a flow model's image features, computed once per slice) is counted once, as it runs.
``FlopCounterMode`` counts the matrix products and convolutions (2 FLOPs per multiply-add);
element-wise operations, normalisation and FFTs are not counted, which under-counts FAA's
spectral branch a little. Timings, which depend on the machine, belong in benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from medflow.models.unet import SegNet, count_parameters
from medflow.segmentation.inference import SamplingOptions
from medflow.segmentation.methods import Method


@dataclass(frozen=True)
class InferenceCost:
    """Cost of predicting one slice.

    Attributes:
        parameters: trainable parameters of the network.
        evaluations: network calls per slice (samples times the sampler's calls).
        gflops: GFLOPs per slice at ``size x size``.
    """

    parameters: int
    evaluations: int
    gflops: float


def inference_cost(
    method: Method, net: SegNet, size: int, options: SamplingOptions = SamplingOptions()
) -> InferenceCost:
    """Count what ``method`` spends predicting one ``size x size`` slice with ``options``
    (a plain UNet: one call, whatever the steps)."""
    image = torch.zeros(1, net.cfg.in_channels, size, size, device=next(net.parameters()).device)
    calls: list[int] = []
    handle = net.register_forward_hook(lambda *_: calls.append(1))
    try:
        with FlopCounterMode(display=False) as counter:
            method.probs(net, image, options)
    finally:
        handle.remove()
    return InferenceCost(count_parameters(net), len(calls), counter.get_total_flops() / 1e9)
