"""Predict label maps with a trained checkpoint, at the input's native resolution.

A volume is predicted slice by slice along the training slice axis and comes back as a
volume of the input's shape, written in the input's format (NIfTI with the input's affine
and header; PNG for PNG; TIFF for TIFF).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medflow.data.datasets import prepare_image
from medflow.data.io import Volume, file_ending, read_image, write_volume
from medflow.data.layout import Case, find_cases
from medflow.data.transforms import Preprocessing, from_slices, resize_images
from medflow.errors import DataError, OutputExistsError
from medflow.models.unet import NetConfig, SegNet
from medflow.segmentation.checkpoint import load_checkpoint
from medflow.segmentation.inference import predict_probs
from medflow.segmentation.runtime import progress, resolve_device


@dataclass(frozen=True)
class SamplingOptions:
    """How a flow model turns noise into a mask.

    Attributes:
        steps: ODE steps (1 = one network evaluation, the default).
        sampler: ``"euler"`` or ``"heun"``.
        samples: noise draws averaged into one soft mask (an ensemble).
        seed: seed of the noise.
        batch_size: slices per network call.
    """

    steps: int = 1
    sampler: str = "euler"
    samples: int = 1
    seed: int = 0
    batch_size: int = 32


class Predictor:
    """A trained network with what it needs to read raw volumes and write label maps."""

    def __init__(self, checkpoint: str | Path, device: str = "auto") -> None:
        ckpt = load_checkpoint(checkpoint)
        self.path = Path(checkpoint)
        self.net_cfg = NetConfig.from_dict(ckpt["net"])
        self.prep = Preprocessing.from_dict(ckpt["preprocessing"])
        self.labels = {str(k): int(v) for k, v in ckpt["labels"].items()}
        self.channel_names = list(ckpt["channel_names"])
        self.min_gap = float(ckpt["config"].get("min_gap", 0.05))
        self.parameterization = str(ckpt["config"].get("parameterization", "endpoint"))
        self.device = resolve_device(device)
        net = SegNet(self.net_cfg)
        try:
            # a resumable checkpoint carries the EMA weights beside the raw ones; predict with
            # the EMA, as checkpoint_best.pt (which holds only them) does
            net.load_state_dict(ckpt.get("ema", ckpt["model"]))
        except RuntimeError as exc:
            raise DataError(
                self.path,
                "weights do not match the architecture stored with "
                "them (corrupt or edited checkpoint)",
            ) from exc
        self.net = net.to(self.device).eval()

    def predict_volume(
        self, image: Volume, options: SamplingOptions = SamplingOptions()
    ) -> np.ndarray:
        """Label map ``(X, Y, Z)`` on the grid of ``image`` (outside the crop: background)."""
        slices, box = prepare_image(image, self.prep)
        probs = predict_probs(
            self.net,
            slices,
            steps=options.steps,
            sampler=options.sampler,
            samples=options.samples,
            seed=options.seed,
            batch_size=options.batch_size,
            parameterization=self.parameterization,
            min_gap=self.min_gap,
        )
        crop_shape = tuple(s.stop - s.start for s in box)
        in_plane = tuple(n for a, n in enumerate(crop_shape) if a != self.prep.slice_axis)
        # back to the native grid in chunks: a full CT at 512 x 512 would need gigabytes at once
        labels = np.concatenate(
            [
                resize_images(chunk, in_plane).argmax(1).numpy().astype(np.int16)
                for chunk in probs.split(options.batch_size)
            ]
        )
        out = np.zeros(image.geometry.shape, dtype=np.int16)
        out[box] = from_slices(labels, self.prep.slice_axis)
        return out


def output_path(case: Case, out_dir: Path) -> Path:
    return out_dir / f"{case.case_id}{file_ending(case.images[0])}"


def predict_folder(
    checkpoint: str | Path,
    inputs: str | Path,
    out_dir: str | Path,
    *,
    options: SamplingOptions = SamplingOptions(),
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
) -> list[Path]:
    """Predict every case found at ``inputs`` (a file or a folder) into ``out_dir``.

    Every input is read and checked before the first output is written (a bad file found
    halfway would otherwise leave a half-filled folder), and each output is written
    atomically. Inputs are read again for prediction rather than held, so memory stays at
    one case whatever the folder's size.
    """
    predictor = Predictor(checkpoint, device)
    cases = find_cases(inputs, None, len(predictor.channel_names))
    out_dir = Path(out_dir)
    targets = [output_path(c, out_dir) for c in cases]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise OutputExistsError(existing[0])
    for case in cases:
        _read_checked(case, predictor)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case, target in progress(
        list(zip(cases, targets)), quiet=quiet, desc="predict", unit="case"
    ):
        volume = _read_checked(case, predictor)
        labels = predictor.predict_volume(volume, options)
        written.append(write_volume(target, labels, volume.geometry))
    return written


def _read_checked(case: Case, predictor: Predictor) -> Volume:
    volume = read_image(case.images)
    n = volume.array.shape[0]
    if n != len(predictor.channel_names):
        raise DataError(
            case.images[0],
            f"has {n} channel(s) but the model was trained on "
            f"{len(predictor.channel_names)} ({', '.join(predictor.channel_names)})",
        )
    return volume
