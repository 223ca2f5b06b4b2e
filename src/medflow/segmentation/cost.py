"""What one prediction costs, counted rather than timed: parameters, network evaluations and
GFLOPs per slice, for any model and sampler setting.

Counting runs the real prediction path (the method's ``probs``)
on one blank slice under torch's ``FlopCounterMode``, so what the path shares between steps
(a flow model's image features, computed once per slice) is counted once, as it runs.
``FlopCounterMode`` counts the matrix products and convolutions (2 FLOPs per multiply-add);
it has no formula for FFTs, so :func:`flop_counter` adds FFTW's benchFFT convention for
them (:data:`FFT_FLOPS`): a real FFT of ``N`` points costs ``2.5 N log2 N`` FLOPs, a complex
one ``5 N log2 N``, with ``N`` the points of one transformed plane (``H * W`` for
``rfft2``) and that cost once per plane (batch times channels). FAA's two ``rfft2`` and one
``irfft2`` are counted that way. Element-wise operations and normalisation (FFT scaling
included) are not counted. Timings, which depend on the machine, belong in benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from medflow.models.unet import SegNet, count_parameters
from medflow.segmentation.inference import SamplingOptions
from medflow.segmentation.methods import Method

aten = torch.ops.aten


def _fft_flops(shape: torch.Size, dim: list[int], per_point: float) -> int:
    """``per_point * N log2 N`` for each of the planes of ``shape`` transformed over ``dim``
    (``N`` points each): the benchFFT estimate of a fast transform of any length."""
    n = math.prod(shape[d] for d in dim)
    planes = math.prod(shape) // max(n, 1)
    return round(per_point * planes * n * math.log2(n)) if n > 1 else 0


def _r2c_flops(x_shape, dim, normalization, onesided, out_shape=None) -> int:
    """``aten._fft_r2c`` (``rfft``, ``rfft2``): a real transform of the real input."""
    return _fft_flops(x_shape, dim, 2.5)


def _c2r_flops(x_shape, dim, normalization, last_dim_size, out_shape=None) -> int:
    """``aten._fft_c2r`` (``irfft``, ``irfft2``): a real transform, sized by its real output."""
    return _fft_flops(out_shape, dim, 2.5)


def _c2c_flops(x_shape, dim, normalization, forward, out_shape=None) -> int:
    """``aten._fft_c2c`` (``fft``, ``fft2``, ``ifft2``): a complex transform."""
    return _fft_flops(x_shape, dim, 5.0)


# the aten ops torch.fft's functions dispatch to (rfft2 -> _fft_r2c over both dims, irfft2 ->
# _fft_c2r), and their FLOPs by the benchFFT convention (module docstring)
FFT_FLOPS = {aten._fft_r2c: _r2c_flops, aten._fft_c2r: _c2r_flops, aten._fft_c2c: _c2c_flops}


def flop_counter() -> FlopCounterMode:
    """torch's ``FlopCounterMode`` (silent) with the FFT formulas of :data:`FFT_FLOPS`."""
    return FlopCounterMode(display=False, custom_mapping=FFT_FLOPS)


@dataclass(frozen=True)
class InferenceCost:
    """Cost of predicting one slice.

    Attributes:
        parameters: trainable parameters of the network.
        evaluations: network calls per slice (samples times the sampler's calls).
        gflops: GFLOPs per slice at ``size x size``, FFTs included (:func:`flop_counter`).
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
        with flop_counter() as counter:
            method.probs(net, image, options)
    finally:
        handle.remove()
    return InferenceCost(count_parameters(net), len(calls), counter.get_total_flops() / 1e9)
