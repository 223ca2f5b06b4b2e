"""Training objective of MedFlowSeg.

``loss = w_flow * L_flow + w_seg * L_seg`` where

* ``L_flow`` regresses the velocity on the straight path. With the endpoint
  parameterisation, ``v_hat - (x1 - x0) = (x1_hat - x1) / (1 - t)`` exactly, so the velocity
  error is the endpoint error weighted by ``1 / (1 - t)^2``. ``weighting="velocity"`` keeps
  that weight (``1 - t`` floored at ``min_gap``: plain conditional flow matching);
  ``weighting="endpoint"`` drops it, weighting all times equally. Both have the same
  minimiser, the posterior mean ``E[x1 | x_t, image]``; they differ in where the finite
  network spends its capacity.
* ``L_seg`` is cross-entropy plus soft Dice (MONAI's ``DiceCELoss``) on the endpoint
  probabilities ``softmax(logits)``. Cross-entropy is a proper scoring rule, so its
  minimiser is also the posterior class probability, i.e. the same endpoint as ``L_flow``;
  it adds a well-conditioned gradient where squared error on a saturated softmax is flat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medflow.flows.parameterization import logits_to_endpoint
from medflow.flows.paths import LinearPath, PathSample

WEIGHTINGS = ("velocity", "endpoint")


@dataclass(frozen=True)
class LossTerms:
    """A batch's loss and its parts (``shortcut``: the self-consistency term, 0 without)."""

    total: torch.Tensor
    flow: torch.Tensor
    seg: torch.Tensor
    shortcut: torch.Tensor | None = None

    def parts(self) -> torch.Tensor:
        """``[total, flow, seg, shortcut]`` detached, for the log."""
        sc = self.shortcut if self.shortcut is not None else self.total.new_zeros(())
        return torch.stack([self.total, self.flow, self.seg, sc]).detach()


def flow_matching_loss(
    logits: torch.Tensor, sample: PathSample, x1: torch.Tensor, weighting: str, min_gap: float
) -> torch.Tensor:
    """Mean squared velocity (or endpoint) error of endpoint logits ``(B, K, H, W)``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    err = logits_to_endpoint(logits) - x1
    if weighting == "velocity":
        gap = (1.0 - sample.t).clamp_min(min_gap).view(-1, 1, 1, 1)
        err = err / gap
    return err.pow(2).mean()


class MedFlowSegLoss:
    """Flow-matching loss plus cross-entropy + Dice on the predicted endpoint.

    With ``parameterization="velocity"`` the network output is the velocity itself and the
    loss is plain conditional flow matching, ``|v_hat - (x1 - x0)|^2``, with no segmentation
    term (there are no class scores to score): the naive flow segmenter, kept as a baseline.

    Args:
        parameterization: ``"endpoint"`` or ``"velocity"``.
        weighting: ``"velocity"`` or ``"endpoint"`` (see module docstring).
        min_gap: floor on ``1 - t``.
        flow_weight: weight of ``L_flow``.
        seg_weight: weight of ``L_seg`` (0 gives plain flow matching).
    """

    def __init__(
        self,
        parameterization: str = "endpoint",
        weighting: str = "endpoint",
        min_gap: float = 0.05,
        flow_weight: float = 1.0,
        seg_weight: float = 1.0,
    ) -> None:
        from monai.losses import DiceCELoss

        if parameterization == "velocity" and seg_weight:
            raise ValueError("seg_weight must be 0 with parameterization='velocity'")
        self.parameterization = parameterization
        self.weighting, self.min_gap = weighting, min_gap
        self.flow_weight, self.seg_weight = flow_weight, seg_weight
        # batch=True pools Dice over the batch so slices without a class do not divide 0 by 0
        self.seg = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)

    def __call__(
        self, logits: torch.Tensor, sample: PathSample, x1: torch.Tensor, mask: torch.Tensor
    ) -> LossTerms:
        logits = logits.float()
        if self.parameterization == "velocity":
            flow = (logits - sample.dx_t).pow(2).mean()
            return LossTerms(self.flow_weight * flow, flow, flow.new_zeros(()))
        flow = flow_matching_loss(logits, sample, x1, self.weighting, self.min_gap)
        seg = self.seg(logits, mask[:, None].long()) if self.seg_weight else flow.new_zeros(())
        return LossTerms(self.flow_weight * flow + self.seg_weight * seg, flow, seg)

    def segmentation_only(self, logits: torch.Tensor, mask: torch.Tensor) -> LossTerms:
        """Cross-entropy + Dice alone, for the discriminative UNet baseline."""
        seg = self.seg(logits.float(), mask[:, None].long())
        return LossTerms(seg, seg.new_zeros(()), seg)


def epsilon_loss(eps_hat: torch.Tensor, eps: torch.Tensor) -> LossTerms:
    """DDPM's simple loss ``|eps_hat - eps|^2`` (mean over every element), alone: the
    diffusion baseline trains as MedSegDiff does, with no segmentation term. It is reported
    in the ``flow`` slot, the denoising term of the run's log."""
    loss = (eps_hat.float() - eps.float()).pow(2).mean()
    return LossTerms(loss, loss, loss.new_zeros(()))


def velocity_matching_loss(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x1: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Plain conditional flow matching for a generative flow: ``|v(x_t, t) - (x1 - x0)|^2``
    with ``x0 ~ N(0, I)`` and ``t ~ U[0, 1)``, drawn from ``generator`` (on the CPU, so a
    seed gives the same run on any device). ``velocity(x_t, t)`` closes over any condition.
    """
    x0 = torch.randn(x1.shape, generator=generator).to(x1.device)
    t = torch.rand(x1.shape[0], generator=generator).to(x1.device)
    sample = LinearPath().sample(x0, x1, t)
    return (velocity(sample.x_t, sample.t).float() - sample.dx_t).pow(2).mean()
