"""The mask flow: generative flow matching over label maps, the source of diversity.

A label map of K classes flows as its one-hot encoding scaled to [-1, 1]
(:func:`medflow.flows.mask_to_flow`), from Gaussian noise at ``t = 0`` to a mask at ``t = 1``;
the sample's label map is the argmax. The network is conditioned on a vector
``c = (present_1, ..., present_{K-1}, 1)``: which foreground classes the mask must hold, and
a flag saying that the condition is given. Training drops the condition (``c = 0``) with
probability ``class_dropout``, so the same network samples unconditionally (``classes=None``)
and class-conditioned (e.g. "masks holding a lesion of class 2").
"""

from __future__ import annotations

import torch

from medflow.flows import flow_to_mask, mask_to_flow
from medflow.flows.losses import velocity_matching_loss
from medflow.flows.samplers import SAMPLERS
from medflow.models.flow_unet import FlowUNet, FlowUNetConfig


def presence(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, H, W)`` label maps -> ``(B, K - 1)`` float: 1 where a foreground class occurs."""
    present = torch.stack([(masks == c).flatten(1).any(1) for c in range(1, num_classes)], 1)
    return present.float()


class MaskFlow:
    """A velocity network over ``(B, K, H, W)`` mask states, with its sampling.

    Args:
        net: a :class:`FlowUNet` with ``state_channels = vector_dim = K``.
    """

    def __init__(self, net: FlowUNet) -> None:
        cfg = net.cfg
        if cfg.vector_dim != cfg.state_channels or cfg.cond_channels:
            raise ValueError(f"a mask flow needs state_channels == vector_dim, got {cfg}")
        self.net = net
        self.num_classes = cfg.state_channels

    @classmethod
    def build(cls, num_classes: int, channels: tuple[int, ...]) -> MaskFlow:
        cfg = FlowUNetConfig(state_channels=num_classes, vector_dim=num_classes, channels=channels)
        return cls(FlowUNet(cfg))

    def condition(self, classes: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The condition vector ``(B, K)`` from a ``(B, K - 1)`` presence vector, or the
        unconditional zeros when ``classes`` is None."""
        device = next(self.net.parameters()).device
        if classes is None:
            return torch.zeros(batch, self.num_classes, device=device)
        if classes.shape != (batch, self.num_classes - 1):
            raise ValueError(
                f"classes must be ({batch}, {self.num_classes - 1}), got {tuple(classes.shape)}"
            )
        return torch.cat([classes.float(), torch.ones(batch, 1)], 1).to(device)

    def loss(
        self, masks: torch.Tensor, generator: torch.Generator, class_dropout: float
    ) -> torch.Tensor:
        """Flow-matching loss on a batch of ``(B, H, W)`` label maps."""
        b = masks.shape[0]
        vec = self.condition(presence(masks.cpu(), self.num_classes), b)
        keep = (torch.rand(b, generator=generator) >= class_dropout).float().to(vec.device)
        vec = vec * keep[:, None]
        x1 = mask_to_flow(masks, self.num_classes)
        return velocity_matching_loss(lambda x, t: self.net(x, t, None, vec), x1, generator)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        size: tuple[int, int],
        generator: torch.Generator,
        steps: int = 20,
        sampler: str = "euler",
        classes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``n`` label maps ``(n, H, W)`` (uint8) from noise drawn with ``generator``."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        device = next(self.net.parameters()).device
        vec = self.condition(classes, n)
        x0 = torch.randn((n, self.num_classes, *size), generator=generator).to(device)
        x1 = SAMPLERS[sampler](lambda x, t, c: self.net(x, t, None, c), x0, vec, steps)
        return flow_to_mask(x1).to(torch.uint8).cpu()
