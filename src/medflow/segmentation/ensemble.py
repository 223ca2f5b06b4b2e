"""An ensemble of checkpoints: their soft masks averaged on the input's grid, as nnU-Net
ensembles its folds (or two configurations, ``nnUNetv2_ensemble``).

Every member reads the volume with its own preprocessing (crop, normalisation, slice size
or planned spacing), predicts with its own method (a flow, a UNet, a diffusion model) and
brings its soft mask back to the native grid (:meth:`Predictor.native_probs`); the mean of
those is decoded by argmax. So members may differ in everything but what they predict: the
labels and the input channels must be the same, which is checked when the ensemble is made.
Post-processing keeps the largest component of a class only where every member's
validation chose it.

``medflow predict --model a.pt b.pt`` predicts with an ensemble; the sampling options
apply to every member (a UNet ignores the steps, as it does alone). Uncertainty maps,
majority-vote fusion and saved samples describe one model's noise draws, so an ensemble
refuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medflow.data.io import Volume
from medflow.errors import DataError, OptionError
from medflow.segmentation.inference import SamplingOptions
from medflow.segmentation.postprocess import keep_largest
from medflow.segmentation.predict import Predictor


class Ensemble:
    """Several checkpoints that predict as one (see the module docstring).

    Args:
        checkpoints: two or more checkpoints written by ``medflow train``.
        device, channels_last, compile, postprocess: as for :class:`Predictor`, for every
            member.

    Raises:
        DataError: a checkpoint is unusable, or predicts other labels or reads other
            channels than the first one (named).
    """

    def __init__(
        self,
        checkpoints: Sequence[str | Path],
        device: str = "auto",
        *,
        channels_last: bool = True,
        compile: bool = False,
        postprocess: bool = True,
    ) -> None:
        if len(checkpoints) < 2:
            raise ValueError(f"an ensemble needs at least two checkpoints, got {len(checkpoints)}")
        self.members = [
            Predictor(
                c, device, channels_last=channels_last, compile=compile, postprocess=postprocess
            )
            for c in checkpoints
        ]
        first = self.members[0]
        for member in self.members[1:]:
            _check_compatible(first, member)
        self.path = first.path
        self.device = first.device
        self.labels = first.labels
        self.channel_names = first.channel_names
        # the classes every member's validation chose to keep as their largest component
        self.largest = sorted(set.intersection(*(set(m.largest) for m in self.members)))

    @property
    def stochastic(self) -> bool:
        """Whether any member's draws differ with the noise."""
        return any(m.stochastic for m in self.members)

    @property
    def num_classes(self) -> int:
        return self.members[0].net_cfg.num_classes

    def check(self, image: Volume) -> None:
        """Every member's dimension check (a 2.5D model refuses a 2D image, ...)."""
        for member in self.members:
            member.check(image)

    def native_probs(
        self, image: Volume, options: SamplingOptions = SamplingOptions()
    ) -> np.ndarray:
        """The members' mean soft mask ``(X, Y, Z, K)`` on the grid of ``image``."""
        total = self.members[0].native_probs(image, options)
        for member in self.members[1:]:
            total += member.native_probs(image, options)
        return total / len(self.members)

    def predict_volume(
        self, image: Volume, options: SamplingOptions = SamplingOptions()
    ) -> np.ndarray:
        """Label map ``(X, Y, Z)``: the argmax of the mean soft mask, post-processed."""
        labels = self.native_probs(image, options).argmax(-1).astype(np.int16)
        return keep_largest(labels, self.largest)


def refuse_per_model_outputs(uncertainty: bool, fusion: str, save_samples: bool) -> None:
    """What an ensemble cannot write, refused before anything is read.

    Raises:
        OptionError: uncertainty maps, saved samples or majority-vote fusion asked of it."""
    asked = [
        flag
        for flag, on in (
            ("--save-samples", save_samples),  # first: it implies --uncertainty
            ("--uncertainty", uncertainty),
            ("--fusion vote", fusion != "mean"),
        )
        if on
    ]
    if asked:
        raise OptionError(
            f"{asked[0]}: describes one model's noise draws; an ensemble of checkpoints "
            "writes masks only (predict with one --model for it)"
        )


def _check_compatible(first: Predictor, member: Predictor) -> None:
    if member.labels != first.labels:
        raise DataError(
            member.path,
            f"predicts labels {member.labels}, but {first.path} predicts "
            f"{first.labels}: an ensemble averages the same classes",
        )
    if member.channel_names != first.channel_names:
        raise DataError(
            member.path,
            f"reads channels {member.channel_names}, but {first.path} reads "
            f"{first.channel_names}: an ensemble's members read the same input",
        )
