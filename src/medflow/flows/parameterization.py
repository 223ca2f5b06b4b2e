"""Turn a network that predicts the endpoint into the velocity field a sampler integrates.

On the straight path the marginal velocity is
``u_t(x) = E[x1 - x0 | x_t = x] = (E[x1 | x_t = x] - x) / (1 - t)``,
so a network that predicts the endpoint ``x1_hat = E[x1 | x_t, image]`` defines the same
field as one that predicts velocity directly. MedFlowSeg's network outputs logits and the
endpoint is ``x1_hat = 2 * softmax(logits) - 1``: a point of the scaled probability simplex,
which is exactly the set the posterior mean of a one-hot mask can take. The parameterisation
therefore restricts nothing, and one Euler step from ``t = 0``,
``x1 = x0 + 1 * u_0(x0) = x1_hat(x0, 0)``, lands on a valid soft mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from medflow.flows.paths import LinearPath

DEFAULT_MIN_GAP = 0.05


def logits_to_endpoint(logits: torch.Tensor) -> torch.Tensor:
    """``(B, K, H, W)`` logits -> endpoint on the scaled simplex, ``2 softmax - 1``."""
    return 2.0 * torch.softmax(logits.float(), dim=1) - 1.0


@dataclass
class Conditioning:
    """What the velocity field is conditioned on: the image, its cached features and, for a
    self-conditioned network, the endpoint estimate of the trajectory being integrated.

    A sampler passes ``cond`` unchanged to every evaluation and never looks inside, so the
    estimate is the field's own state: :class:`FlowField` reads it before an evaluation and
    writes that evaluation's estimate after it. One ``Conditioning`` therefore follows one
    trajectory; :meth:`trajectory` starts another on the same cached features.

    Attributes:
        image: ``(B, C, H, W)`` network-ready image.
        feats: its image-branch features (None: computed by the network per call).
        estimate: ``(B, K, H, W)`` class probabilities of the latest endpoint estimate
            (None: none yet, which the network reads as zeros).
    """

    image: torch.Tensor
    feats: list[torch.Tensor] | None = None
    estimate: torch.Tensor | None = None

    def trajectory(self, estimate: torch.Tensor | None = None) -> Conditioning:
        """The same image and features for a new trajectory, starting from ``estimate``."""
        return dataclasses.replace(self, estimate=estimate)


PARAMETERIZATIONS = ("endpoint", "velocity")


class FlowField:
    """``velocity(x, t, cond)`` for a :class:`~medflow.models.unet.SegNet` in flow mode.

    Args:
        net: maps ``(x_t, t, image)`` to K output channels.
        parameterization: ``"endpoint"`` (the outputs are logits of the endpoint, the
            default) or ``"velocity"`` (the outputs are the velocity itself, as a naive flow
            segmenter has it; kept for comparison).
        min_gap: floor on ``1 - t`` in the endpoint's velocity (reached only at the end).
        step: jump size ``d`` for a network with a step input (a shortcut model): the field
            is then the average velocity over a jump of ``d``, and Euler with ``1 / d`` steps
            draws a posterior sample (:mod:`medflow.flows.shortcut`). None: the
            instantaneous velocity (``d = 0``), whose one-step end is the posterior mean.

    A network built with ``self_condition`` reads ``cond.estimate`` at every evaluation
    and the field stores there the class probabilities of the endpoint it predicted, so the
    next step of any sampler is conditioned on the previous step's estimate and the first
    step on none (zeros): the one-step prediction stays one evaluation.
    """

    def __init__(
        self,
        net: nn.Module,
        parameterization: str = "endpoint",
        min_gap: float = DEFAULT_MIN_GAP,
        step: float | None = None,
    ) -> None:
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"unknown parameterization {parameterization!r}; "
                f"expected one of {PARAMETERIZATIONS}"
            )
        self.self_condition = bool(getattr(getattr(net, "cfg", None), "self_condition", False))
        if self.self_condition and parameterization != "endpoint":
            raise ValueError("self-conditioning needs the endpoint parameterization")
        self.net = net
        self.parameterization = parameterization
        self.min_gap = min_gap
        self.step = step

    def condition(self, image: torch.Tensor) -> Conditioning:
        """Compute the image-branch features once for all steps of a sampler."""
        feats = self.net.image_features(image) if hasattr(self.net, "image_features") else None
        return Conditioning(image, feats)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.jump(x, t, None if self.step is None else torch.full_like(t, self.step), cond)

    def jump(
        self, x: torch.Tensor, t: torch.Tensor, step: torch.Tensor | None, cond: Conditioning
    ) -> torch.Tensor:
        """Velocity at ``(x, t)`` averaged over jumps of per-row size ``step`` ``(B,)``
        (None: the instantaneous velocity)."""
        extra = {} if step is None else {"step": step}
        if self.self_condition:
            extra["estimate"] = cond.estimate
        out = self.net(x, t, cond.image, feats=cond.feats, **extra)
        if self.parameterization == "velocity":
            return out.to(x.dtype)
        probs = torch.softmax(out.float(), dim=1)
        if self.self_condition:
            cond.estimate = probs.detach()
        x1_hat = (2.0 * probs - 1.0).to(x.dtype)  # logits_to_endpoint, probabilities kept
        return LinearPath.velocity_from_endpoint(x1_hat, x, t, self.min_gap)
