"""The judge term of ``synth align`` (``AlignConfig.judge_weight``): a frozen segmenter that
reads the target's kind of image must still find each aligned image's mask in it.

Why: the reward matches the tissue's statistics to the references' with no regard to the
masks, and on both simulated sites it was met by flattening the classes (white minus grey
0.09-0.34 in the aligned images against 0.61 / 0.44 on the real target, docs/ALIGNFLOW.md):
the pairs taught masks the images no longer showed (an oracle segmenter read them at 0.57 /
0.65 Dice, unaligned 0.72). Class anchors hold each class's mean to an estimate of the
target's, but no estimate from K unlabelled slices was reliable
(benchmarks/anchor_estimate.py). The judge asks for the relation instead of the values: a
segmenter trained on the source under strong appearance augmentation (gamma, bias field,
blur, noise; the harness's ``augmented`` arm) reads target-site images at about 0.7 Dice,
so it does not demand source appearance, but it cannot find classes that are not there.

The term is the judge's mean cross-entropy over each image's tissue pixels against the mask
that conditioned the image, with the judge's default prediction run with gradients to the
images, its weights frozen: one Euler step from fixed starting noise for a MedFlowSeg judge
(what ``medflow predict`` does by default), the softmax for a UNet; a diffusion judge is
refused (its sampler has no differentiable one-step form here).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from medflow.errors import MedflowError
from medflow.flows.encoding import flow_to_probs
from medflow.flows.samplers import euler_with_grad
from medflow.segmentation.methods import OneStepFlow, UNetProbs
from medflow.segmentation.predict import Predictor

NOISE_SEED = 0  # the judge's starting noise for a flow segmenter, the same on every call


class SegmenterJudge:
    """A frozen ``medflow train`` checkpoint as a differentiable judge of (image, mask) pairs.

    Args:
        checkpoint: the segmenter's checkpoint.
        n_classes: the synthesis model's classes (background included); the judge must
            segment as many.
        device: where to run it.

    Raises:
        DataError: an unreadable checkpoint (from :class:`Predictor`).
        MedflowError: a judge of another number of classes.
    """

    def __init__(self, checkpoint: str | Path, n_classes: int, device: torch.device) -> None:
        predictor = Predictor(checkpoint, str(device))
        if max(predictor.labels.values()) + 1 != n_classes:
            raise MedflowError(
                f"{checkpoint}: segments {max(predictor.labels.values()) + 1} classes, the "
                f"synthesis model {n_classes}"
            )
        module, self.inputs = predictor.method.export_module(predictor.net)
        if not isinstance(module, OneStepFlow | UNetProbs):
            raise MedflowError(
                f"{checkpoint}: a {predictor.method.name} segmenter cannot judge; train the "
                "judge with --method medflowseg or unet"
            )
        self.module = module.to(device).eval().requires_grad_(False)
        self.size = predictor.prep.size
        self.n_classes = n_classes

    def probs(self, view: torch.Tensor) -> torch.Tensor:
        """The judge's class probabilities ``(B, K, H, W)`` of images as the segmenter sees
        them, resized to its training size and back (differentiable in ``view``)."""
        size = view.shape[2:]
        x = view if tuple(size) == tuple(self.size) else _resize(view, self.size)
        if isinstance(self.module, UNetProbs):
            probs = self.module(x)
        else:  # one Euler step with gradients (the exported module's sampler has none)
            gen = torch.Generator(device="cpu").manual_seed(NOISE_SEED)
            noise = torch.randn((x.shape[0], self.n_classes, *x.shape[2:]), generator=gen)
            field = self.module.field
            x1 = euler_with_grad(field, noise.to(x), field.condition(x), steps=1, checkpoint=False)
            probs = flow_to_probs(x1)
        return probs if probs.shape[2:] == size else _resize(probs, size)

    def __call__(self, view: torch.Tensor, fg: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the tissue pixels of ``fg`` ``(B, 1, H, W)`` of the judge's
        prediction against ``masks`` ``(B, H, W)``."""
        log_p = self.probs(view).clamp_min(1e-6).log()
        nll = F.nll_loss(log_p, masks.long(), reduction="none")  # (B, H, W)
        tissue = fg[:, 0].to(nll.dtype)
        return (nll * tissue).sum() / tissue.sum().clamp_min(1.0)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
