"""The image flow: mask-conditioned image generation by flow matching.

The state is the normalised image ``(B, C, H, W)`` (as ``medflow train`` prepares it); the
condition is the mask's flow encoding ``(B, K, H, W)`` concatenated with the state at every
step, so the structure of the generated image is the mask's. Noise at ``t = 0``, image at
``t = 1``; plain conditional flow matching. The velocity is a plain function
``velocity(x, t, cond)`` so the samplers of :mod:`medflow.flows.samplers` integrate it, with
or without gradients (stage 2 back-propagates a reward through the sampler).
"""

from __future__ import annotations

import torch

from medflow.flows import mask_to_flow
from medflow.flows.losses import velocity_matching_loss
from medflow.flows.samplers import SAMPLERS, euler_with_grad
from medflow.models.flow_unet import FlowUNet, FlowUNetConfig


class ImageFlow:
    """A velocity network over ``(B, C, H, W)`` images conditioned on ``(B, H, W)`` masks.

    Args:
        net: a :class:`FlowUNet` with ``state_channels = C`` and ``cond_channels = K``.
    """

    def __init__(self, net: FlowUNet) -> None:
        if net.cfg.cond_channels < 2 or net.cfg.vector_dim:
            raise ValueError(f"an image flow needs a mask condition, got {net.cfg}")
        self.net = net
        self.num_classes = net.cfg.cond_channels
        self.channels = net.cfg.state_channels

    @classmethod
    def build(cls, in_channels: int, num_classes: int, channels: tuple[int, ...]) -> ImageFlow:
        cfg = FlowUNetConfig(
            state_channels=in_channels, cond_channels=num_classes, channels=channels
        )
        return cls(FlowUNet(cfg))

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        return mask_to_flow(masks.to(device), self.num_classes)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` velocity at state ``x``, times ``t (B,)``, encoded masks ``cond``."""
        return self.net(x, t, cond)

    def loss(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        cond = self.encode(masks)
        return velocity_matching_loss(lambda x, t: self.net(x, t, cond), images, generator)

    def noise(self, masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        device = next(self.net.parameters()).device
        shape = (masks.shape[0], self.channels, *masks.shape[-2:])
        return torch.randn(shape, generator=generator).to(device)

    @torch.no_grad()
    def sample(
        self,
        masks: torch.Tensor,
        generator: torch.Generator,
        steps: int = 20,
        sampler: str = "euler",
    ) -> torch.Tensor:
        """Images ``(B, C, H, W)`` for label maps ``(B, H, W)``, from noise drawn with
        ``generator``."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        x0 = self.noise(masks, generator)
        return SAMPLERS[sampler](self.velocity, x0, self.encode(masks), steps).cpu()

    def sample_with_grad(
        self,
        masks: torch.Tensor,
        x0: torch.Tensor,
        steps: int,
        checkpoint: bool = True,
        on_step=None,
    ) -> torch.Tensor:
        """Euler samples that carry gradients to the network's parameters (stage 2)."""
        return euler_with_grad(self.velocity, x0, self.encode(masks), steps, checkpoint, on_step)
