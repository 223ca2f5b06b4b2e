"""The image flow: mask-conditioned image generation by flow matching.

The state is the normalised image ``(B, C, H, W)`` (as ``medflow train`` prepares it); the
condition is the mask's flow encoding ``(B, K, H, W)`` concatenated with the state at every
step, so the structure of the generated image is the mask's. Noise at ``t = 0``, image at
``t = 1``; plain conditional flow matching. The velocity is a plain function
``velocity(x, t, cond)`` so the samplers of :mod:`medflow.flows.samplers` integrate it, with
or without gradients (stage 2 back-propagates a reward through the sampler).

Translation (``start > 0``, SDEdit-style): instead of noise at ``t = 0`` the sampler starts
from the path's state at ``t0 = start`` for a real image ``x1`` of the mask,
``x_{t0} = (1 - t0) * noise + t0 * x1`` (:meth:`ImageFlow.noised`), and integrates from
``t0`` to 1 only, in ``steps`` uniform Euler steps.
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

    @staticmethod
    def noised(noise: torch.Tensor, images: torch.Tensor, start: float) -> torch.Tensor:
        """The path's state at ``t = start``: ``(1 - start) * noise + start * images``, both
        ``(B, C, H, W)`` (``images`` moved to ``noise``'s device)."""
        return (1.0 - start) * noise + start * images.to(noise.device, noise.dtype)

    @torch.no_grad()
    def sample(
        self,
        masks: torch.Tensor,
        generator: torch.Generator,
        steps: int = 20,
        sampler: str = "euler",
        *,
        start: float = 0.0,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images ``(B, C, H, W)`` for label maps ``(B, H, W)``, from noise drawn with
        ``generator``; with ``start > 0``, translated from ``images`` ``(B, C, H, W)`` (the
        real images of the masks): Euler from the partly noised images at ``start`` to 1."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        x0 = self.noise(masks, generator)
        if start == 0.0:
            return SAMPLERS[sampler](self.velocity, x0, self.encode(masks), steps).cpu()
        if sampler != "euler" or images is None or images.shape != x0.shape:
            raise ValueError(
                f"translation from t0={start} needs the euler sampler and images of shape "
                f"{tuple(x0.shape)}, got {sampler!r} and "
                f"{None if images is None else tuple(images.shape)}"
            )
        return self.sample_with_grad(
            masks, self.noised(x0, images, start), steps, start=start
        ).cpu()

    def sample_with_grad(
        self,
        masks: torch.Tensor,
        x0: torch.Tensor,
        steps: int,
        checkpoint: bool = True,
        on_step=None,
        *,
        start: float = 0.0,
    ) -> torch.Tensor:
        """Euler samples that carry gradients to the network's parameters (stage 2), from the
        state ``x0`` at ``t = start`` (noise for 0, :meth:`noised` images otherwise) to
        ``t = 1`` in ``steps`` uniform steps: the gradient passes through those steps only.
        Under ``torch.no_grad`` it is plain Euler (what :func:`~medflow.flows.samplers.euler`
        computes for ``start = 0``)."""
        return euler_with_grad(
            self.velocity, x0, self.encode(masks), steps, checkpoint, on_step, start=start
        )
