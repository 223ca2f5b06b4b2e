"""Predict label maps with a trained checkpoint, at the input's native resolution.

A volume is predicted slice by slice along the training slice axis and comes back as a
volume of the input's shape, written in the input's format (NIfTI with the input's affine
and header; PNG for PNG; TIFF for TIFF).

With ``uncertainty=True`` every noise draw is kept apart (sample ``s`` from seed
``seed + s``), fused by mean or majority vote, and a variance and an entropy map are written
beside each mask (:mod:`medflow.uncertainty.maps`, docs/UNCERTAINTY.md).
"""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medflow import __version__
from medflow.data.datasets import check_dims, prepare_image
from medflow.data.io import (
    NIFTI_ENDINGS,
    PNG_ENDINGS,
    Geometry,
    Volume,
    atomic_write,
    file_ending,
    read_image,
    staged_outputs,
    write_volume,
)
from medflow.data.layout import Case, find_cases
from medflow.data.naming import MAPS, PROBABILITIES, map_name, sample_name, split_map_name
from medflow.data.transforms import Preprocessing, from_slices, resize_images
from medflow.engine.checkpoint import load_checkpoint
from medflow.engine.distributed import Ranks, barrier, process_group
from medflow.engine.runtime import configure_net, progress, resolve_device
from medflow.errors import DataError, OutputExistsError
from medflow.models.unet import NetConfig, SegNet
from medflow.segmentation.inference import SamplingOptions
from medflow.segmentation.methods import method_from_checkpoint
from medflow.segmentation.postprocess import keep_largest
from medflow.segmentation.sliding import window_probs
from medflow.uncertainty.fusion import SampleStats
from medflow.uncertainty.maps import entropy_map, png_scale

# written beside the masks by an uncertainty run: checkpoint, options, cases, version
RECORD = "prediction.json"
# fill value and dtype outside the crop box of each native map of predict_uncertain
FILL = {
    "labels": (0, np.int16),
    "conf": (1, np.float32),
    "var": (0, np.float32),
    "ent": (0, np.float32),
}


@dataclass(frozen=True)
class Prediction:
    """A label map with its uncertainty, all ``(X, Y, Z)`` on the input's grid.

    Outside the crop box the network never sees, the label is background with confidence 1,
    variance 0 and entropy 0.

    Attributes:
        labels: fused label map (int16).
        confidence: mean soft-mask probability of the fused label (float32).
        variance: variance across samples, summed over classes (float32).
        entropy: predictive entropy of the mean soft mask in nats (float32).
        samples: noise draws fused (1 for a plain UNet, which has no noise).
        box: the crop box in ``(X, Y, Z)`` that the network predicted; outside it every
            voxel is background by construction.
        sample_labels: ``(S, X, Y, Z)`` every sample's own label map (int16), when kept.
        probabilities: ``(X, Y, Z, K)`` the soft mask the labels were decoded from
            (float32; background 1 outside the box), when the samples are kept.
    """

    labels: np.ndarray
    confidence: np.ndarray
    variance: np.ndarray
    entropy: np.ndarray
    samples: int
    box: tuple[slice, slice, slice]
    sample_labels: np.ndarray | None = None
    probabilities: np.ndarray | None = None


class Predictor:
    """A trained network with what it needs to read raw volumes and write label maps.

    Args:
        checkpoint: a checkpoint written by ``medflow train``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        channels_last: run the network in channels-last memory format (the default: batched
            inference 22-33 % faster on the CPU and never slower in docs/PERFORMANCE.md; the
            outputs agree with the contiguous network to float rounding).
        compile: run the network through ``torch.compile`` (each new batch shape compiles
            first, tens of seconds on a CPU); off by default, see docs/PERFORMANCE.md for
            what it measures. :attr:`net` stays the uncompiled module.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "auto",
        *,
        channels_last: bool = True,
        compile: bool = False,
        postprocess: bool = True,
    ) -> None:
        ckpt = load_checkpoint(checkpoint)
        self.path = Path(checkpoint)
        self.device = resolve_device(device)
        try:
            self.net_cfg = NetConfig.from_dict(ckpt["net"])
            self.prep = Preprocessing.from_dict(ckpt["preprocessing"])
            self.labels = {str(k): int(v) for k, v in ckpt["labels"].items()}
            self.channel_names = list(ckpt["channel_names"])
            self.method = method_from_checkpoint(ckpt)
            # classes whose largest component alone is kept (chosen on validation)
            post = ckpt.get("postprocessing") or {}
            self.largest = (
                [int(c) for c in post.get("largest_component", [])] if postprocess else []
            )
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
        # what probs() calls: the same parameters, maybe channels-last and/or compiled
        self._runner = configure_net(self.net, channels_last=channels_last, compile=compile)

    def sampling(self, options: SamplingOptions) -> SamplingOptions:
        """``options`` with the sampler and steps this model takes by default filled in,
        checked against its method.

        Raises:
            OptionError: a sampler or steps the method does not take."""
        return self.method.resolve(options)

    def probs(
        self, slices: torch.Tensor, options: SamplingOptions, per_sample: bool = False
    ) -> torch.Tensor:
        """Class probabilities of network-ready ``slices`` under ``options``, by this
        checkpoint's method (:mod:`medflow.segmentation.methods`); slices of a planned
        model, at its spacing and of any size, window by window over its training patch
        (:mod:`medflow.segmentation.sliding`)."""
        if self.prep.spacing is None:
            return self.method.probs(self._runner, slices, options, per_sample=per_sample)
        return window_probs(
            self.method, self._runner, slices, options, self.prep.size, per_sample=per_sample
        )

    def predict_volume(
        self, image: Volume, options: SamplingOptions = SamplingOptions()
    ) -> np.ndarray:
        """Label map ``(X, Y, Z)`` on the grid of ``image`` (outside the crop: background),
        decoded from :meth:`mask_options`' soft mask."""
        options = self.mask_options(options)
        slices, box = prepare_image(image, self.prep)
        probs = self.probs(slices, options)
        # back to the native grid in chunks: a full CT at 512 x 512 would need gigabytes at once
        labels = np.concatenate(
            [
                chunk.argmax(1).numpy().astype(np.int16)
                for chunk in self._native_chunks(probs, box, options.batch_size)
            ]
        )
        return keep_largest(
            self._paste(labels, box, image.geometry.shape, 0, np.int16), self.largest
        )

    def native_probs(
        self, image: Volume, options: SamplingOptions = SamplingOptions()
    ) -> np.ndarray:
        """The soft mask ``(X, Y, Z, K)`` (float32, each voxel's classes summing to 1) on the
        grid of ``image`` that :meth:`predict_volume`'s labels are the argmax of, before
        post-processing; outside the crop box background is certain. What an ensemble of
        checkpoints averages (:mod:`medflow.segmentation.ensemble`)."""
        options = self.mask_options(options)
        slices, box = prepare_image(image, self.prep)
        probs = self.probs(slices, options)
        soft = np.concatenate(
            [
                (chunk.clamp(0, 1) / chunk.clamp(0, 1).sum(1, keepdim=True).clamp_min(1e-12))
                .movedim(1, -1)
                .numpy()
                .astype(np.float32)
                for chunk in self._native_chunks(probs, box, options.batch_size)
            ]
        )
        shape = image.geometry.shape
        return np.stack(
            [
                self._paste(soft[..., c], box, shape, float(c == 0), np.float32)
                for c in range(soft.shape[-1])
            ],
            axis=-1,
        )

    def _native_chunks(self, probs: torch.Tensor, box, step: int):
        """``probs`` ``(N, K, h, w)`` resized to the crop box's in-plane size, ``step``
        slices at a time."""
        in_plane = self._in_plane(box)
        for chunk in probs.split(step):
            yield resize_images(chunk.float(), in_plane)

    def check(self, image: Volume) -> None:
        """Refuse an image of dimensions the model cannot read (a 2D image for 2.5D, ...)."""
        check_dims(image, self.prep)

    @property
    def stochastic(self) -> bool:
        """Whether samples differ: a flow or diffusion model, or a UNet with dropout."""
        return self.method.stochastic(self.net_cfg)

    @property
    def posterior(self) -> bool:
        """Whether the model draws posterior samples in one evaluation (shortcut jumps)."""
        return self.method.posterior

    def mask_options(self, options: SamplingOptions) -> SamplingOptions:
        """The resolved options the mask is predicted with (for a model with shortcut jumps
        and ``sampler="auto"``, the one-evaluation posterior mean)."""
        return self.method.mask_options(options)

    def uncertain_options(self, options: SamplingOptions) -> tuple[SamplingOptions, bool]:
        """The resolved options the samples of :meth:`predict_uncertain` are drawn with, and
        whether the mask comes from a separate one-evaluation posterior mean (a model with
        shortcut jumps and ``sampler="auto"``)."""
        return self.method.sample_options(options)

    def predict_uncertain(
        self,
        image: Volume,
        options: SamplingOptions = SamplingOptions(),
        keep_samples: bool = False,
    ) -> Prediction:
        """Label map and uncertainty maps on the grid of ``image``.

        Sample ``s`` of ``options.samples`` starts from the noise of seed ``options.seed + s``.
        For a model with shortcut jumps and ``sampler="auto"`` the samples are posterior
        samples (one evaluation each) and, with ``fusion="mean"``, the mask and its
        confidence and entropy come from the one-evaluation posterior mean
        (:meth:`mask_options`); the variance is the samples' spread. Otherwise the samples
        are the chosen sampler's draws, the same ones :meth:`predict_volume` averages.
        Either way, with ``fusion="mean"`` the label map equals :meth:`predict_volume`'s.
        A plain UNet has no noise: it is run once, and its variance is 0.
        With ``keep_samples`` every sample's own label map is kept as well.
        """
        sample_opts, separate_mean = self.uncertain_options(options)
        slices, box = prepare_image(image, self.prep)
        in_plane, shape = self._in_plane(box), image.geometry.shape
        stats, kept = SampleStats(), []
        for probs in self.probs(slices, sample_opts, per_sample=True):
            stats.add(probs)
            if keep_samples:
                kept.append(self._native_labels(probs, box, shape, sample_opts.batch_size))
        mean = stats.mean
        if separate_mean:
            mean = self.probs(slices, self.mask_options(options)).to(torch.float64)
        parts = self._native_maps(stats, mean, in_plane, sample_opts, keep_samples)
        soft = parts.pop("probs", None)
        paste = {k: self._paste(np.concatenate(v), box, shape, *FILL[k]) for k, v in parts.items()}
        if soft is not None:
            soft = np.concatenate(soft)  # (N, A, B, K); background is certain off the box
            paste["probs"] = np.stack(
                [
                    self._paste(soft[..., c], box, shape, float(c == 0), np.float32)
                    for c in range(soft.shape[-1])
                ],
                axis=-1,
            )
        return Prediction(
            labels=keep_largest(paste["labels"], self.largest),
            confidence=paste["conf"],
            variance=paste["var"],
            entropy=paste["ent"],
            samples=stats.count,
            box=box,
            sample_labels=np.stack(kept) if keep_samples else None,
            probabilities=paste["probs"] if keep_samples else None,
        )

    def _native_labels(self, probs, box, shape, step: int) -> np.ndarray:
        """One sample's label map on the native grid ``shape``."""
        in_plane = self._in_plane(box)
        labels = [
            resize_images(chunk, in_plane).argmax(1).numpy().astype(np.int16)
            for chunk in probs.split(step)
        ]
        return self._paste(np.concatenate(labels), box, shape, 0, np.int16)

    def _native_maps(
        self,
        stats: SampleStats,
        mean: torch.Tensor,
        in_plane,
        options: SamplingOptions,
        with_probs: bool,
    ) -> dict[str, list[np.ndarray]]:
        """Labels, confidence, variance, entropy (and, ``with_probs``, the soft mask
        ``(N, A, B, K)``), chunk by chunk at native in-plane size (crop box only)."""
        parts: dict[str, list[np.ndarray]] = {k: [] for k in FILL}
        if with_probs:
            parts["probs"] = []
        step = options.batch_size
        scores, variance = stats.scores(options.fusion), stats.variance
        for start in range(0, mean.shape[0], step):
            part = slice(start, start + step)
            # entropy and confidence of the resized soft mask: the probabilities that decide
            # the label at each native voxel
            probs = resize_images(mean[part].float(), in_plane).clamp(0, 1)
            probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-12)
            if options.fusion == "mean":
                labels = probs.argmax(1)
            else:
                labels = resize_images(scores[part], in_plane).argmax(1)
            parts["labels"].append(labels.numpy().astype(np.int16))
            parts["conf"].append(probs.gather(1, labels[:, None])[:, 0].numpy())
            parts["ent"].append(entropy_map(probs).numpy())
            var = resize_images(variance[part][:, None], in_plane)[:, 0].clamp_min(0)
            parts["var"].append(var.numpy())
            if with_probs:
                parts["probs"].append(probs.movedim(1, -1).numpy().astype(np.float32))
        return parts

    def _in_plane(self, box: tuple[slice, slice, slice]) -> tuple[int, int]:
        crop_shape = tuple(s.stop - s.start for s in box)
        return tuple(n for a, n in enumerate(crop_shape) if a != self.prep.slice_axis)

    def _paste(
        self,
        slices: np.ndarray,
        box: tuple[slice, slice, slice],
        shape: tuple[int, int, int],
        fill: float,
        dtype: type,
    ) -> np.ndarray:
        """Slices ``(N, A, B)`` of the crop box into a ``fill``-valued volume ``shape``."""
        out = np.full(shape, fill, dtype=dtype)
        out[box] = from_slices(slices, self.prep.slice_axis)
        return out


def output_path(case: Case, out_dir: Path) -> Path:
    return out_dir / f"{case.case_id}{file_ending(case.images[0])}"


def map_paths(case: Case, out_dir: Path) -> list[Path]:
    """Where ``--uncertainty`` writes a case's maps: ``<case>_variance``, ``<case>_entropy``."""
    ending = file_ending(case.images[0])
    return [out_dir / map_name(case.case_id, kind, ending) for kind in MAPS]


def sample_paths(case: Case, out_dir: Path, samples: int) -> list[Path]:
    """Where ``--save-samples`` writes a case's sample label maps (in the input's format),
    then its soft mask ``<case>_probabilities``: a 4D NIfTI ``(X, Y, Z, K)`` whatever the
    input's format (PNG and TIFF hold no 4D float arrays that read back unambiguously)."""
    ending = file_ending(case.images[0])
    soft = ending if ending in NIFTI_ENDINGS else ".nii.gz"
    return [out_dir / sample_name(case.case_id, j, ending) for j in range(samples)] + [
        out_dir / f"{case.case_id}_{PROBABILITIES}{soft}"
    ]


def write_probabilities(path: Path, probs: np.ndarray, geometry: Geometry) -> Path:
    """Write a soft mask ``(X, Y, Z, K)`` as a float32 4D NIfTI on the input's affine
    (identity for PNG and TIFF inputs)."""
    import nibabel as nib

    img = nib.Nifti1Image(probs.astype(np.float32), geometry.affine)
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


@dataclass(frozen=True)
class _Outputs:
    """What a prediction run writes and removes: per case its mask (``targets``), its maps
    and samples (``maps``, the samples and soft mask also in ``kept``), and the files of an
    earlier run it replaces without rewriting (``stale``, removed once every case is in)."""

    targets: list[Path]
    maps: dict[str, list[Path]]
    kept: dict[str, list[Path]]
    stale: list[Path]


def drawn_samples(predictor: Predictor, options: SamplingOptions) -> int:
    """Samples a run draws per case (1 for a deterministic UNet)."""
    return options.samples if predictor.stochastic else 1


def _plan_outputs(
    cases: list[Case],
    out_dir: Path,
    drawn: int,
    uncertainty: bool,
    save_samples: bool,
    force: bool,
) -> _Outputs:
    """Every output of the run, checked against what ``out_dir`` holds: a map, sample or
    soft mask left beside a case's mask by an earlier run is an output of that case either
    way: replaced or removed with ``force`` (so none describes another mask, and no sample
    of an earlier, larger ``--samples`` is scored with the new ones), never touched without.

    Raises:
        OutputExistsError: any of them exists and ``force`` is off.
    """
    targets = [output_path(c, out_dir) for c in cases]
    kept = {c.case_id: sample_paths(c, out_dir, drawn) if save_samples else [] for c in cases}
    maps = {c.case_id: map_paths(c, out_dir) + kept[c.case_id] for c in cases}
    written = set(targets) | {p for c in cases for p in (maps[c.case_id] if uncertainty else [])}
    earlier = [p for c in cases for p in map_paths(c, out_dir) + _sample_files(c, out_dir)]
    outputs = targets + [p for c in cases for p in maps[c.case_id]] + earlier
    if uncertainty:
        outputs.append(out_dir / RECORD)
    existing = [p for p in dict.fromkeys(outputs) if p.exists()]
    if existing and not force:
        raise OutputExistsError(existing[0])
    stale = [p for p in dict.fromkeys(earlier) if p.exists() and p not in written]
    if stale and not uncertainty and (out_dir / RECORD).exists():
        stale.append(out_dir / RECORD)  # it describes the maps being removed
    return _Outputs(targets, maps, kept, stale)


def _sample_files(case: Case, out_dir: Path) -> list[Path]:
    """A case's sample label maps and soft mask that ``out_dir`` holds, whatever their count
    and ending."""
    if not out_dir.is_dir():
        return []
    found = []
    for path in sorted(out_dir.glob(f"{glob.escape(case.case_id)}_*")):
        try:
            stem = path.name[: -len(file_ending(path))]
        except DataError:
            continue  # not an image file
        split = split_map_name(stem)
        if split and split[0] == case.case_id and split[1] not in MAPS:
            found.append(path)
    return found


def _predictor(
    checkpoint: str | Path | Sequence[str | Path], device: str, *, per_model: tuple, **net
):
    """A :class:`Predictor` for one checkpoint, an :class:`~medflow.segmentation.ensemble.
    Ensemble` for several (which first refuses the ``per_model`` outputs it cannot write)."""
    if isinstance(checkpoint, (str, Path)):
        return Predictor(checkpoint, device, **net)
    if len(checkpoint) == 1:
        return Predictor(checkpoint[0], device, **net)
    from medflow.segmentation.ensemble import Ensemble, refuse_per_model_outputs

    refuse_per_model_outputs(*per_model)
    return Ensemble(checkpoint, device, **net)


def predict_folder(
    checkpoint: str | Path | Sequence[str | Path],
    inputs: str | Path,
    out_dir: str | Path,
    *,
    options: SamplingOptions = SamplingOptions(),
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
    uncertainty: bool = False,
    channels_last: bool = True,
    compile: bool = False,
    save_samples: bool = False,
    postprocess: bool = True,
) -> list[Path]:
    """Predict every case found at ``inputs`` (a file or a folder) into ``out_dir``.

    Every input is read and checked before the first output is written (a bad file found
    halfway would otherwise leave a half-filled folder), and outputs are written into a hidden
    folder in ``out_dir`` and moved into place together once every case is done, so a failure
    (a full disk) leaves nothing behind. Inputs are read again for prediction rather than
    held, so memory stays at one case whatever the folder's size.

    With ``uncertainty``, each mask gets a variance and an entropy map beside it
    (:func:`map_paths`) and ``out_dir`` a ``prediction.json`` naming the checkpoint, the
    options and the cases. Then, and for ``options.fusion == "vote"``, the samples are kept
    apart and fused by :meth:`Predictor.predict_uncertain`; either way sample ``s`` starts
    from the noise of seed ``seed + s``, so maps or not, the mean-fused mask is the same.
    Maps left by an earlier run for the same cases count as existing outputs: without
    ``force`` they stop the run; with it and without ``uncertainty`` they are removed (with
    ``prediction.json``), so no map describes another mask.

    Under torchrun, rank ``r`` of ``N`` predicts ``cases[r::N]`` (every rank checks every
    input first, so a bad file stops all of them before any output) and every rank returns
    the whole list once all outputs are in place (docs/DISTRIBUTED.md).

    ``channels_last``, ``compile`` and ``postprocess`` set up the network as
    :class:`Predictor` does. Several checkpoints predict as an ensemble (their soft masks
    averaged on the native grid, :mod:`medflow.segmentation.ensemble`), masks only.

    With ``save_samples`` (which implies ``uncertainty``) every sample's label map and the
    soft mask the labels come from are written too (:func:`sample_paths`), for
    ``medflow evaluate --raters``.

    Returns:
        The paths of the masks (not of the maps), in case order.
    """
    uncertainty = uncertainty or save_samples
    predictor = _predictor(
        checkpoint,
        device,
        channels_last=channels_last,
        compile=compile,
        postprocess=postprocess,
        per_model=(uncertainty, options.fusion, save_samples),
    )
    ranks = Ranks.from_env()
    cases = find_cases(inputs, None, len(predictor.channel_names))
    out_dir = Path(out_dir)
    plan = _plan_outputs(cases, out_dir, drawn_samples(predictor, options), uncertainty,
                         save_samples, force)  # fmt: skip
    targets, maps, kept, stale = plan.targets, plan.maps, plan.kept, plan.stale
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
                if uncertainty or options.fusion != "mean":
                    pred = predictor.predict_uncertain(volume, options, keep_samples=save_samples)
                    _write_staged(stage, target, pred.labels, volume.geometry)
                    k = predictor.net_cfg.num_classes
                    for path, kind in zip(maps[case.case_id] if uncertainty else [], MAPS):
                        _write_map_staged(
                            stage, path, getattr(pred, kind), volume.geometry, kind, k
                        )
                    if save_samples:
                        _write_samples_staged(stage, kept[case.case_id], pred, volume.geometry)
                else:
                    labels = predictor.predict_volume(volume, options)
                    _write_staged(stage, target, labels, volume.geometry)
                written.append(target)
            if uncertainty and ranks.main:
                _write_record(stage / RECORD, predictor, options, cases)
            # no rank moves its outputs into place before every rank has predicted its share:
            # a rank that fails makes the others' barrier fail, and their stages are deleted
            barrier()
        if ranks.main:
            for path in stale:
                path.unlink(missing_ok=True)
        barrier()  # every rank's outputs are in place
    return targets if ranks.active else written


def _write_samples_staged(
    stage: Path, paths: list[Path], pred: Prediction, geometry: Geometry
) -> None:
    *sample_targets, soft = paths
    for target, labels in zip(sample_targets, pred.sample_labels, strict=True):
        _write_staged(stage, target, labels, geometry)
    try:
        write_probabilities(stage / soft.name, pred.probabilities, geometry)
    except OSError as exc:
        raise DataError(soft, f"cannot be written: {exc.strerror or exc}") from exc


def _write_record(
    path: Path, predictor: Predictor, options: SamplingOptions, cases: list[Case]
) -> None:
    import json

    sample_opts, separate_mean = predictor.uncertain_options(options)
    record = {
        "model": str(predictor.path.resolve()),
        "method": predictor.method.name,
        "options": dataclasses.asdict(sample_opts),
        # the mask's source: the one-evaluation posterior mean, or the samples fused
        "mask": (
            "posterior mean (one Euler step)" if separate_mean else f"{options.fusion} of samples"
        ),
        "samples_drawn": drawn_samples(predictor, options),
        "maps": list(MAPS),
        "labels": predictor.labels,
        "cases": [c.case_id for c in cases],
        "medflow_version": __version__,
        "torch_version": torch.__version__,
    }
    try:
        path.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise DataError(path.parent.parent / path.name, f"cannot be written: {exc}") from exc


def _write_staged(stage: Path, target: Path, labels: np.ndarray, geometry: Geometry) -> None:
    try:
        write_volume(stage / target.name, labels, geometry)
    except OSError as exc:  # disk full, permission denied: the user's to fix, named
        raise DataError(target, f"cannot be written: {exc.strerror or exc}") from exc


def write_map(
    path: str | Path, values: np.ndarray, geometry: Geometry, kind: str, num_classes: int
) -> Path:
    """Write an uncertainty map ``(X, Y, Z)``: float32 NIfTI/TIFF, or a 16-bit PNG scaled by
    :func:`~medflow.uncertainty.maps.png_scale` (PNG holds no reals)."""
    path = Path(path)
    if file_ending(path) not in PNG_ENDINGS:
        return write_volume(path, np.asarray(values, dtype=np.float32), geometry)
    from PIL import Image

    if tuple(values.shape) != tuple(geometry.shape) or values.shape[2] != 1:
        raise DataError(path, f"map of shape {values.shape} is not one plane of {geometry.shape}")
    scaled = np.clip(values[:, :, 0] / png_scale(kind, num_classes), 0.0, 1.0)
    plane = np.rint(scaled * 65535).astype(np.uint16)
    return atomic_write(path, lambda tmp: Image.fromarray(plane).save(tmp, format="PNG"))


def _write_map_staged(
    stage: Path, target: Path, values: np.ndarray, geometry: Geometry, kind: str, k: int
) -> None:
    try:
        write_map(stage / target.name, values, geometry, kind, k)
    except OSError as exc:
        raise DataError(target, f"cannot be written: {exc.strerror or exc}") from exc


def _read_checked(case: Case, predictor: Predictor) -> Volume:
    volume = read_image(case.images)
    predictor.check(volume)
    n = volume.array.shape[0]
    if n != len(predictor.channel_names):
        raise DataError(
            case.images[0],
            f"has {n} channel(s) but the model was trained on "
            f"{len(predictor.channel_names)} ({', '.join(predictor.channel_names)})",
        )
    return volume
