"""Soft predictions for batches of slices, shared by validation and ``medflow predict``."""

from __future__ import annotations

import torch

from medflow.flows.encoding import flow_to_probs
from medflow.flows.parameterization import FlowField
from medflow.flows.samplers import SAMPLERS
from medflow.models.unet import SegNet
from medflow.segmentation.runtime import autocast


@torch.no_grad()
def predict_probs(
    net: SegNet,
    images: torch.Tensor,
    *,
    steps: int = 1,
    sampler: str = "euler",
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    parameterization: str = "endpoint",
    min_gap: float = 0.05,
) -> torch.Tensor:
    """Class probabilities ``(N, K, H, W)`` (float32, on CPU) for slices ``(N, C, H, W)``.

    A flow network integrates from Gaussian noise with ``sampler`` for ``steps`` steps
    (one Euler step, one network evaluation, by default); with ``samples > 1`` it averages the
    soft masks reached from independent noise draws. A plain UNet is one softmax.
    Noise comes from a CPU generator seeded with ``seed``, so results do not depend on the
    device or on ``batch_size``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    if steps < 1 or samples < 1:
        raise ValueError(f"steps and samples must be >= 1, got {steps} and {samples}")
    device = next(net.parameters()).device
    k = net.cfg.num_classes
    was_training = net.training
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    # one noise tensor per sample for the whole set, drawn before batching
    noise = [
        torch.randn(images.shape[0], k, *images.shape[-2:], generator=gen)
        for _ in range(samples if net.cfg.flow else 0)
    ]
    out = []
    velocity = FlowField(net, parameterization, min_gap)
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        with autocast(device):
            if not net.cfg.flow:
                probs = torch.softmax(net(x).float(), dim=1)
            else:
                cond = velocity.condition(x)
                probs = torch.zeros(x.shape[0], k, *x.shape[-2:], device=device)
                for z in noise:
                    x0 = z[start : start + batch_size].to(device)
                    x1 = SAMPLERS[sampler](velocity, x0, cond, steps)
                    probs += flow_to_probs(x1.float())
                probs /= len(noise)
        out.append(probs.float().cpu())
    net.train(was_training)
    return torch.cat(out)
