"""Predict label maps with a trained checkpoint, at the input's native resolution.

A volume is predicted slice by slice along the training slice axis and comes back as a
volume of the input's shape, written in the input's format (NIfTI with the input's affine
and header; PNG for PNG; TIFF for TIFF).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medflow.data.datasets import check_dims, prepare_image
from medflow.data.io import Geometry, Volume, file_ending, read_image, staged_outputs, write_volume
from medflow.data.layout import Case, find_cases
from medflow.data.transforms import Preprocessing, from_slices, resize_images
from medflow.errors import DataError, OutputExistsError
from medflow.models.unet import NetConfig, SegNet
from medflow.segmentation.checkpoint import load_checkpoint
from medflow.segmentation.distributed import Ranks, barrier, process_group
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
        self.device = resolve_device(device)
        try:
            self.net_cfg = NetConfig.from_dict(ckpt["net"])
            self.prep = Preprocessing.from_dict(ckpt["preprocessing"])
            self.labels = {str(k): int(v) for k, v in ckpt["labels"].items()}
            self.channel_names = list(ckpt["channel_names"])
            self.min_gap = float(ckpt["config"].get("min_gap", 0.05))
            self.parameterization = str(ckpt["config"].get("parameterization", "endpoint"))
            net = SegNet(self.net_cfg)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise DataError(
                self.path,
                f"settings stored in the checkpoint are unusable (corrupt or edited "
                f"checkpoint): {type(exc).__name__}: {str(exc)[:120]}",
            ) from exc
        try:
            # a resumable checkpoint carries the EMA weights beside the raw ones; predict with
            # the EMA, as checkpoint_best.pt (which holds only them) does
            net.load_state_dict(ckpt.get("ema", ckpt["model"]))
        except RuntimeError as exc:
            # torch lists every mismatch on its own line after a header; the first one says
            # which tensor and which shapes
            lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
            first = f"; {lines[0][:160]}" if lines else ""
            raise DataError(
                self.path,
                "weights do not match the architecture stored with "
                f"them (corrupt or edited checkpoint){first}",
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
    halfway would otherwise leave a half-filled folder), and outputs are written into a hidden
    folder in ``out_dir`` and moved into place together once every case is done, so a failure
    (a full disk) leaves nothing behind. Inputs are read again for prediction rather than
    held, so memory stays at one case whatever the folder's size.

    Under torchrun, rank ``r`` of ``N`` predicts ``cases[r::N]`` (every rank checks every
    input first, so a bad file stops all of them before any output) and every rank returns
    the whole list once all outputs are in place (docs/DISTRIBUTED.md).
    """
    predictor = Predictor(checkpoint, device)
    ranks = Ranks.from_env()
    cases = find_cases(inputs, None, len(predictor.channel_names))
    out_dir = Path(out_dir)
    targets = [output_path(c, out_dir) for c in cases]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise OutputExistsError(existing[0])
    for case in cases:
        _read_checked(case, predictor)
    written = []
    with process_group(ranks, predictor.device):
        barrier()  # no rank writes before every rank has checked for existing outputs
        # all or nothing: outputs appear in out_dir once every case has been written
        with staged_outputs(out_dir) as stage:
            for case, target in progress(
                ranks.shard(list(zip(cases, targets))),
                quiet=quiet or not ranks.main,
                desc="predict",
                unit="case",
            ):
                volume = _read_checked(case, predictor)
                labels = predictor.predict_volume(volume, options)
                _write_staged(stage, target, labels, volume.geometry)
                written.append(target)
            # no rank moves its outputs into place before every rank has predicted its share:
            # a rank that fails makes the others' barrier fail, and their stages are deleted
            barrier()
        barrier()  # every rank's outputs are in place
    return targets if ranks.active else written


def _write_staged(stage: Path, target: Path, labels: np.ndarray, geometry: Geometry) -> None:
    try:
        write_volume(stage / target.name, labels, geometry)
    except OSError as exc:  # disk full, permission denied: the user's to fix, named
        raise DataError(target, f"cannot be written: {exc.strerror or exc}") from exc


def _read_checked(case: Case, predictor: Predictor) -> Volume:
    volume = read_image(case.images)
    check_dims(volume, predictor.prep)
    n = volume.array.shape[0]
    if n != len(predictor.channel_names):
        raise DataError(
            case.images[0],
            f"has {n} channel(s) but the model was trained on "
            f"{len(predictor.channel_names)} ({', '.join(predictor.channel_names)})",
        )
    return volume
