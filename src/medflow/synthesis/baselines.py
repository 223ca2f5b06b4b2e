"""Training sets of the baselines the AlignFlow harness compares against, written as nnU-Net
raw datasets beside the synthetic ones (same labels, same reader, same segmenter):

* :func:`augmented_dataset`: the source (or any training set, synthetic pairs included) plus
  ``copies`` copies of every case through strong appearance augmentation (MONAI's
  ``RandAdjustContrast``, ``RandBiasField``, ``RandGaussianSmooth``,
  ``RandSimulateLowResolution``, ``RandGaussianNoise``), drawn once per copy (offline: the
  segmenter's training loop is not changed, so a copy is one fixed draw, not a new draw per
  step);
* :func:`histogram_matched_dataset`: the source with every case's tissue intensities mapped
  so that their distribution is that of the K reference images' tissue.

Both keep an exact zero background at exactly zero and tissue above it, so the crop to the
nonzero box and the z-score run over the same voxels as for the source case.

The augmentation ranges are wide, nnU-Net-like ranges; note that they contain the simulated
site's parameters (gamma 0.5, a ±0.3 log-gain bias field, 2x coarser in-plane grid, 8 %
noise: ``medflow.data.shift``), which favours this baseline on that site.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from medflow.data.io import PNG_ENDINGS, build_folder, read_image, read_label, write_volume
from medflow.data.layout import DatasetSpec, load_dataset
from medflow.data.naming import is_synthetic
from medflow.synthesis.align import References

GAMMA = (0.5, 2.0)  # RandAdjustContrast: x -> x ** gamma on [0, 1]
BIAS_COEFFS = (-0.15, 0.15)  # RandBiasField, degree 3 in-plane: max |log gain| ~0.25-0.55
BLUR_SIGMA = (0.5, 1.5)  # RandGaussianSmooth, in-plane, in voxels; probability 0.5
ZOOM = (0.5, 1.0)  # RandSimulateLowResolution, in-plane; probability 0.5
NOISE = 0.1  # RandGaussianNoise: std uniform in [0, NOISE] x the tissue's std
ROBUST_MAX = 99.5  # intensities are divided by this percentile of the tissue first
_FLOOR = 1e-3  # tissue is kept at >= this fraction of the robust maximum (never 0)


def _tissue(x: np.ndarray) -> np.ndarray:
    """Where a channel ``(X, Y, Z)`` holds tissue: its nonzero voxels when at least a tenth
    of it is exact zero background (the reader's rule), else everywhere."""
    return x != 0 if (x == 0).mean() >= 0.1 else np.ones(x.shape, dtype=bool)


def augment_volume(image: np.ndarray, slice_axis: int, seed: int) -> np.ndarray:
    """One strong appearance augmentation of ``image`` ``(C, X, Y, Z)`` (module docstring);
    spatial filters act in-plane, i.e. on each slice across ``slice_axis``, with one draw of
    their parameters for the whole volume. Returns float32 of the same shape."""
    from monai.transforms import (
        RandAdjustContrast,
        RandBiasField,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandSimulateLowResolution,
    )

    rng = np.random.default_rng(seed)
    out = np.empty(image.shape, dtype=np.float32)
    for c, x in enumerate(image.astype(np.float32)):
        tissue = _tissue(x)
        scale = float(np.percentile(x[tissue], ROBUST_MAX)) or 1.0
        # slices as MONAI channels: a 2D transform then treats every slice alike
        y = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x / scale, slice_axis, 0)))
        spread = float((x[tissue] / scale).std())
        steps = [
            RandAdjustContrast(prob=1.0, gamma=GAMMA),
            RandBiasField(degree=3, coeff_range=BIAS_COEFFS, prob=1.0),
            RandGaussianSmooth(sigma_x=BLUR_SIGMA, sigma_y=BLUR_SIGMA, prob=0.5),
            RandSimulateLowResolution(prob=0.5, zoom_range=ZOOM, upsample_mode="bilinear"),
            RandGaussianNoise(prob=1.0, std=NOISE * spread),
        ]
        for step in steps:
            step.set_random_state(int(rng.integers(2**31)))
            y = torch.as_tensor(step(y))
        y = np.moveaxis(np.asarray(y, dtype=np.float32), 0, slice_axis) * scale
        # an exact zero background stays zero and the tissue above it, as in the source
        out[c] = y if tissue.all() else np.where(tissue, np.maximum(y, _FLOOR * scale), 0.0)
    return out


def match_tissue(x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``x`` ``(X, Y, Z)`` with its tissue values replaced by the ``target`` values at the
    same quantile (histogram matching of the cumulative distributions; ties keep one
    value), shifted to stay above zero; background stays 0."""
    tissue = _tissue(x)
    values, inverse, counts = np.unique(x[tissue], return_inverse=True, return_counts=True)
    quantile = (np.cumsum(counts) - 0.5 * counts) / tissue.sum()
    mapped = np.quantile(np.asarray(target, dtype=np.float64), quantile)[inverse]
    if not tissue.all():
        # the reader z-scores the tissue: only its shape matters, so lift it above 0
        mapped = mapped - mapped.min() + _FLOOR * max(float(np.ptp(mapped)), 1.0)
    out = np.zeros(x.shape, dtype=np.float32)
    out[tissue] = mapped
    return out


def _write_like(source: DatasetSpec, out: Path, cases: list[tuple[str, np.ndarray, Path]]) -> dict:
    """An nnU-Net raw dataset at ``out`` (whole or not at all) holding ``cases``: ``(case id,
    image (C, X, Y, Z) on the grid of the label file, label file to copy)``."""
    ending = source.file_ending

    def write(tmp: Path) -> dict:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case_id, image, label in cases:
            geometry = read_label(label).geometry
            for c, channel in enumerate(image):
                if ending in PNG_ENDINGS:
                    channel = np.clip(np.round(channel), 0, 255).astype(np.uint8)
                write_volume(tmp / "imagesTr" / f"{case_id}_{c:04d}{ending}", channel, geometry)
            shutil.copy2(label, tmp / "labelsTr" / f"{case_id}{ending}")
        meta = {
            "channel_names": {str(i): n for i, n in enumerate(source.channel_names)},
            "labels": dict(source.labels),
            "numTraining": len(cases),
            "file_ending": ending,
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        return meta

    return build_folder(out, write)


def augmented_id(case_id: str, copy: int) -> str:
    """The case id of augmented copy ``copy`` of ``case_id``: ``aug0_<id>``, except that a
    synthetic case keeps its prefix in front (``synth_00003_aug0``), so that
    ``TrainConfig.synthetic_fraction`` still counts its copies as synthetic."""
    return f"{case_id}_aug{copy}" if is_synthetic(case_id) else f"aug{copy}_{case_id}"


def augmented_dataset(
    source: str | Path, out: str | Path, copies: int, slice_axis: int, seed: int
) -> Path:
    """The training cases of ``source`` and ``copies`` augmented copies of each
    (:func:`augment_volume`, seeded by ``seed``, the copy and the case) at ``out``; copy
    ``j`` of case ``x`` is :func:`augmented_id` ``(x, j)``."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    spec = load_dataset(source)
    cases = []
    for i, case in enumerate(spec.training):
        image = read_image(case.images).array
        cases.append((case.case_id, image, case.label))
        for copy in range(copies):
            draw = seed * 1_000_003 + copy * 10_007 + i
            augmented = augment_volume(image, slice_axis, draw)
            cases.append((augmented_id(case.case_id, copy), augmented, case.label))
    _write_like(spec, Path(out), cases)
    return Path(out)


def reference_tissue(refs: References) -> list[np.ndarray]:
    """Per channel, the tissue pixel values of the prepared references (normalised units)."""
    fg = refs.foreground[:, 0]
    return [refs.images[:, c][fg].numpy() for c in range(refs.images.shape[1])]


def histogram_matched_dataset(source: str | Path, refs: References, out: str | Path) -> Path:
    """The source's training cases with every channel's tissue histogram-matched
    (:func:`match_tissue`) to the references' tissue, at ``out``."""
    spec = load_dataset(source)
    target = reference_tissue(refs)
    cases = []
    for case in spec.training:
        image = read_image(case.images).array
        matched = np.stack([match_tissue(x, t) for x, t in zip(image, target, strict=True)])
        cases.append((case.case_id, matched, case.label))
    _write_like(spec, Path(out), cases)
    return Path(out)
