"""What a dataset is: the fingerprint that :mod:`medflow.data.plan` turns into a training plan.

nnU-Net's idea (its ``DatasetFingerprintExtractor``): read every training case once and keep
only what decides how to train on the data, so that planning is a pure function of a small
record. :func:`fingerprint_dataset` measures, from the training cases:

* per case: the spatial shape ``(X, Y, Z)``, the voxel spacing in mm and the shape of the
  nonzero bounding box (medflow crops to it before anything else, as nnU-Net does);
* per channel: intensity statistics over **foreground** voxels (label > 0) pooled over the
  cases: mean, standard deviation, median, 0.5 and 99.5 percentiles, minimum, maximum. At
  most ``samples // n_cases`` foreground voxels per case are drawn, without replacement,
  from a generator seeded by ``(seed, case index)``, so memory is bounded and the result
  does not depend on anything but the files and the seed. A case without foreground gives
  no samples; when no case has any, every voxel is used (``Fingerprint.foreground_stats``
  is then False);
* per class (background included): the number of voxels over all label maps;
* per foreground class: every connected object (``scipy.ndimage.label``, full connectivity:
  26 neighbours in 3D, 8 in 2D, the convention of BraTS' lesion-wise metrics) with its size
  in voxels, in mm^3 (mm^2 for a 2D image) and its equivalent diameter in mm (the diameter
  of the sphere, or disc, of the same size);
* the channel names of ``dataset.json`` and the normalisation scheme each implies
  (:func:`medflow.data.transforms.scheme_for`: a channel named ``CT`` is CT, as in nnU-Net).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from medflow.data.io import read_image, read_label
from medflow.data.layout import DatasetSpec
from medflow.data.transforms import nonzero_box, scheme_for
from medflow.errors import DataError

# nnU-Net draws 10^8 foreground voxels over the whole dataset; a tenth is plenty for five
# numbers per channel and keeps the pooled samples of a 2-core CI machine in a few MB.
DEFAULT_SAMPLES = 10_000_000
PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class CaseFingerprint:
    """One training case.

    Attributes:
        case_id: the case's name.
        shape: spatial shape ``(X, Y, Z)`` (a 2D image has a singleton axis).
        spacing: voxel size in mm per axis, rounded to 1e-6 mm.
        crop_shape: shape of the bounding box of voxels nonzero in any channel.
    """

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    crop_shape: tuple[int, int, int]


@dataclass(frozen=True)
class ChannelStats:
    """Intensity statistics of one channel over sampled foreground voxels.

    Attributes:
        name: the channel's name in ``dataset.json``.
        scheme: the normalisation scheme the name implies (``"ct"``, ``"zscore"``, ...).
        mean: mean intensity.
        std: standard deviation.
        median: median.
        p00_5: 0.5th percentile.
        p99_5: 99.5th percentile.
        min: minimum of the samples.
        max: maximum of the samples.
        n_samples: number of voxels the statistics are computed from.
    """

    name: str
    scheme: str
    mean: float
    std: float
    median: float
    p00_5: float
    p99_5: float
    min: float
    max: float
    n_samples: int


@dataclass(frozen=True)
class ClassObjects:
    """Connected objects of one foreground class over all training label maps.

    Attributes:
        name: the class name.
        value: its label value.
        voxels: size of every object in voxels, in case order.
        size_mm: size of every object in mm^3 (mm^2 for 2D images).
        diameter_mm: equivalent diameter of every object in mm.
        cases_with: number of cases holding at least one object of the class.
    """

    name: str
    value: int
    voxels: tuple[int, ...]
    size_mm: tuple[float, ...]
    diameter_mm: tuple[float, ...]
    cases_with: int

    @property
    def count(self) -> int:
        """Number of objects."""
        return len(self.voxels)

    @property
    def median_diameter_mm(self) -> float | None:
        """Median equivalent diameter in mm, ``None`` without objects."""
        return float(np.median(self.diameter_mm)) if self.diameter_mm else None

    @property
    def typical_diameter_mm(self) -> float | None:
        """Voxel-weighted median equivalent diameter in mm: the diameter of the object that
        a voxel of the class drawn at random belongs to (half the class's voxels lie in
        objects at least this large). Unlike the plain median it ignores specks beside one
        large structure. ``None`` without objects."""
        if not self.diameter_mm:
            return None
        order = np.argsort(self.diameter_mm)
        weights = np.cumsum(np.asarray(self.voxels, dtype=np.float64)[order])
        k = int(np.searchsorted(weights, 0.5 * weights[-1]))
        return float(np.asarray(self.diameter_mm)[order][k])


@dataclass(frozen=True)
class Fingerprint:
    """What the training cases of a dataset are (see the module docstring).

    Attributes:
        name: the dataset's name.
        channel_names: names of the channels in ``dataset.json`` order.
        class_names: class names ordered by label value (background first).
        cases: one record per training case, sorted by case id.
        intensity: one record per channel.
        class_voxels: voxels of each class, by label value, over all training label maps.
        objects: one record per foreground class (label values 1..K-1).
        foreground_stats: True when the intensity statistics are over foreground voxels,
            False when no case had any and every voxel was used.
        dims: 2 when the cases are 2D images (a singleton spatial axis), else 3.
    """

    name: str
    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]
    cases: tuple[CaseFingerprint, ...]
    intensity: tuple[ChannelStats, ...]
    class_voxels: tuple[int, ...]
    objects: tuple[ClassObjects, ...]
    foreground_stats: bool = True
    dims: int = field(default=3)

    @property
    def schemes(self) -> tuple[str, ...]:
        """Normalisation scheme per channel."""
        return tuple(c.scheme for c in self.intensity)

    @property
    def class_frequency(self) -> tuple[float, ...]:
        """Fraction of all label-map voxels held by each class, by label value."""
        total = max(sum(self.class_voxels), 1)
        return tuple(v / total for v in self.class_voxels)

    @property
    def spacings(self) -> np.ndarray:
        """``(N, 3)`` spacing of every case in mm."""
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    @property
    def crop_shapes(self) -> np.ndarray:
        """``(N, 3)`` nonzero-box shape of every case."""
        return np.array([c.crop_shape for c in self.cases], dtype=np.int64)

    def to_dict(self) -> dict:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Fingerprint:
        """The fingerprint written by :meth:`to_dict`."""
        return cls(
            name=str(d["name"]),
            channel_names=tuple(d["channel_names"]),
            class_names=tuple(d["class_names"]),
            cases=tuple(
                CaseFingerprint(
                    case_id=c["case_id"],
                    shape=_ints(c["shape"]),
                    spacing=tuple(float(s) for s in c["spacing"]),
                    crop_shape=_ints(c["crop_shape"]),
                )
                for c in d["cases"]
            ),
            intensity=tuple(ChannelStats(**c) for c in d["intensity"]),
            class_voxels=_ints(d["class_voxels"]),
            objects=tuple(
                ClassObjects(
                    name=o["name"],
                    value=int(o["value"]),
                    voxels=_ints(o["voxels"]),
                    size_mm=tuple(float(v) for v in o["size_mm"]),
                    diameter_mm=tuple(float(v) for v in o["diameter_mm"]),
                    cases_with=int(o["cases_with"]),
                )
                for o in d["objects"]
            ),
            foreground_stats=bool(d.get("foreground_stats", True)),
            dims=int(d.get("dims", 3)),
        )


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def connected_objects(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask of any dimension, full connectivity (26
    neighbours in 3D, 8 in 2D).

    Returns:
        ``(labels, n)``: an integer map (0 outside, ``1..n`` per object) and the count.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels, n = ndimage.label(mask, structure=structure)
    return labels, int(n)


def object_measure(spacing: tuple[float, ...], shape: tuple[int, ...]) -> tuple[float, int]:
    """The size of one voxel (mm^3, or mm^2 over the non-singleton axes of a 2D image) and
    the dimension it measures in (3 or 2)."""
    axes = [a for a in range(len(shape)) if shape[a] > 1] if 1 in shape else range(len(shape))
    dim = 2 if 1 in shape else len(shape)
    return float(np.prod([spacing[a] for a in axes])) if axes else 1.0, dim


def equivalent_diameter(size_mm: float, dim: int) -> float:
    """Diameter in mm of the sphere (``dim`` 3) or disc (``dim`` 2) of size ``size_mm``."""
    if dim == 2:
        return 2.0 * math.sqrt(size_mm / math.pi)
    return (6.0 * size_mm / math.pi) ** (1.0 / 3.0)


def fingerprint_dataset(
    spec: DatasetSpec, samples: int = DEFAULT_SAMPLES, seed: int = 1234
) -> Fingerprint:
    """Measure the training cases of ``spec`` (see the module docstring).

    Args:
        spec: the dataset, from :func:`medflow.data.layout.load_dataset`.
        samples: most foreground voxels drawn per channel over the whole dataset (split
            evenly over the cases) for the intensity statistics.
        seed: seeds the voxel draws.

    Returns:
        The dataset's fingerprint.

    Raises:
        DataError: a case cannot be read, its label map's shape differs from its image's, or
            it holds a label value that ``dataset.json`` does not declare.
        ValueError: ``samples`` below 1.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    n_classes = spec.num_classes
    per_case = max(1, samples // max(len(spec.training), 1))
    cases, fg_draws, all_draws = [], [], []
    class_voxels = np.zeros(n_classes, dtype=np.int64)
    objects: list[list[tuple[int, float, float]]] = [[] for _ in range(n_classes - 1)]
    cases_with = np.zeros(max(n_classes - 1, 0), dtype=np.int64)
    dims = 3
    for index, case in enumerate(spec.training):
        image = read_image(case.images)
        label = read_label(case.label)
        geom = image.geometry
        if label.array.shape != geom.shape:
            raise DataError(
                label.path, f"label has shape {label.array.shape}, image has {geom.shape}"
            )
        counts = np.bincount(label.array.ravel(), minlength=n_classes)
        if counts.size > n_classes:
            bad = int(np.flatnonzero(counts[n_classes:])[0]) + n_classes
            raise DataError(
                label.path,
                f"holds label value {bad}, but dataset.json declares only 0..{n_classes - 1}",
            )
        class_voxels += counts
        box = nonzero_box(image.array)
        cases.append(
            CaseFingerprint(
                case_id=case.case_id,
                shape=geom.shape,
                # NIfTI holds float32: 1.2 is read as 1.2000000476837158
                spacing=tuple(round(float(s), 6) for s in geom.spacing),
                crop_shape=tuple(s.stop - s.start for s in box),
            )
        )
        if index == 0:
            dims = geom.dims  # a dataset holds 2D images or 3D volumes (verify checks)
        rng = np.random.default_rng([seed, index])
        fg = label.array > 0
        fg_draws.append(_draw(image.array, fg, per_case, rng))
        all_draws.append(_draw(image.array, None, per_case, rng) if not fg.any() else None)
        _add_objects(label.array, geom.spacing, objects, cases_with)
    has_fg = any(d.shape[1] for d in fg_draws)
    if has_fg:
        pooled = np.concatenate(fg_draws, axis=1)
    else:
        pooled = np.concatenate([d for d in all_draws if d is not None], axis=1)
    names = spec.class_names
    return Fingerprint(
        name=spec.name,
        channel_names=spec.channel_names,
        class_names=names,
        cases=tuple(cases),
        intensity=tuple(
            _channel_stats(name, pooled[c]) for c, name in enumerate(spec.channel_names)
        ),
        class_voxels=tuple(int(v) for v in class_voxels),
        objects=tuple(
            ClassObjects(
                name=names[k + 1],
                value=k + 1,
                voxels=tuple(o[0] for o in objs),
                size_mm=tuple(o[1] for o in objs),
                diameter_mm=tuple(o[2] for o in objs),
                cases_with=int(cases_with[k]),
            )
            for k, objs in enumerate(objects)
        ),
        foreground_stats=has_fg,
        dims=dims,
    )


def _draw(
    image: np.ndarray, where: np.ndarray | None, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``(C, m)`` values of at most ``n`` voxels drawn without replacement (all voxels when
    ``where`` is None, else those where it is True)."""
    flat = image.reshape(image.shape[0], -1)
    index = np.arange(flat.shape[1]) if where is None else np.flatnonzero(where.ravel())
    if index.size > n:
        index = np.sort(rng.choice(index, size=n, replace=False))
    return flat[:, index].astype(np.float64)


def _channel_stats(name: str, values: np.ndarray) -> ChannelStats:
    lo, hi = np.percentile(values, PERCENTILES)
    return ChannelStats(
        name=name,
        scheme=scheme_for(name),
        mean=float(values.mean()),
        std=float(values.std()),
        median=float(np.median(values)),
        p00_5=float(lo),
        p99_5=float(hi),
        min=float(values.min()),
        max=float(values.max()),
        n_samples=int(values.size),
    )


def _add_objects(
    label: np.ndarray,
    spacing: tuple[float, float, float],
    objects: list[list[tuple[int, float, float]]],
    cases_with: np.ndarray,
) -> None:
    voxel_mm, dim = object_measure(spacing, label.shape)
    for k in range(len(objects)):
        components, n = connected_objects(label == k + 1)
        if n == 0:
            continue
        cases_with[k] += 1
        sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
        for v in sizes.tolist():
            size = v * voxel_mm
            objects[k].append((int(v), size, equivalent_diameter(size, dim)))
