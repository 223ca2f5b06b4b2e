"""SIMULATED lesions in a real brain image: the small-target embedded set ``mni152-lesions``.

The anatomy is real (nilearn's MNI152 T1 at 1 mm, :mod:`medflow.data.builtin`); every lesion
is simulated here. :func:`simulate_case` takes one slab of the template, inserts its own
lesions and applies its own mild gain and bias field, so that cases cut from the same slab
still differ. It is pure numpy/scipy (no I/O) and works on any brain-like volume, which is
how the tests check it on a small phantom.

A lesion (:class:`Lesion`) has a nominal diameter ``d`` drawn log-uniformly in
``[min_diameter_mm, max_diameter_mm]`` (small lesions are the common ones) and one of two
shapes:

* ``"ellipsoid"``: semi-axes ``d/2 * (s1, s2, s3)`` with ``s`` in [0.6, 1] rescaled to a
  product of 1 (so ``d`` is the equivalent diameter), randomly rotated;
* ``"blob"``: the same ellipsoid with its boundary radius modulated by
  ``1 + 0.35 g(direction)``, ``g`` a sum of four random low-frequency cosines of the
  direction with ``|g| <= 1``; the shape stays star-shaped around its centre, hence one
  connected object.

Edges are partial-volume blended: with ``s`` the (approximate) signed distance to the
boundary in mm, the occupancy is ``clip(0.5 - s / voxel, 0, 1)``, a one-voxel ramp. The
label is ``occupancy >= 0.5`` inside the brain; the image is multiplied by
``1 + contrast * occupancy``, ``contrast`` in ``[-0.6, -0.15]`` (hypo-intense) or
``[0.15, 0.6]`` (hyper-intense), so voxels outside the brain stay exactly 0.

Placement: a *deep* lesion's centre lies deeper inside the brain (distance to the nearest
non-brain voxel of the slab) than its boundary's farthest point plus 1 mm, so it is whole; a
*cortical* one lies closer to the surface than 0.7 x its boundary's nearest point, so it
always reaches the brain's outer surface (the cortex) and is clipped there. Centres keep the
lesion's reach from the slab's top and bottom where the slab is thick enough, and lesions
keep 2 mm apart (each is its own connected object). A fraction of cases gets no lesion.

Each case is then multiplied by a gain in ``[0.9, 1.1]`` and a smooth bias field
``exp(b p(x))``, ``p`` a random polynomial of degree 2 in the voxel coordinates scaled to
``max |p| = 1`` over the brain, ``b`` in ``[0.05, 0.15]`` (gains of about 0.86-1.16).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

SHAPES = ("ellipsoid", "blob")
BLOB_AMPLITUDE = 0.35
MIN_SEPARATION_MM = 2.0


@dataclass(frozen=True)
class LesionConfig:
    """How lesions are drawn for one case.

    Attributes:
        min_diameter_mm: smallest nominal diameter.
        max_diameter_mm: largest nominal diameter.
        max_lesions: a case with lesions has 1 .. max_lesions of them (uniform).
        empty_fraction: probability that a case has no lesion.
        blob_fraction: probability that a lesion is an irregular blob (else an ellipsoid).
        cortical_fraction: probability that a lesion reaches the brain's surface.
        hypo_fraction: probability that a lesion is darker than the tissue around it.
        min_contrast: smallest relative intensity change ``|contrast|``.
        max_contrast: largest relative intensity change.
        gain_range: range of the case's global intensity gain.
        bias_range: range of the bias field's strength ``b``.
    """

    min_diameter_mm: float = 3.0
    max_diameter_mm: float = 30.0
    max_lesions: int = 5
    empty_fraction: float = 0.2
    blob_fraction: float = 0.5
    cortical_fraction: float = 0.3
    hypo_fraction: float = 0.5
    min_contrast: float = 0.15
    max_contrast: float = 0.6
    gain_range: tuple[float, float] = (0.9, 1.1)
    bias_range: tuple[float, float] = (0.05, 0.15)

    def __post_init__(self) -> None:
        checks = [
            (0 < self.min_diameter_mm <= self.max_diameter_mm, "diameters"),
            (self.max_lesions >= 1, "max_lesions"),
            (0 <= self.empty_fraction <= 1, "empty_fraction"),
            (0 <= self.blob_fraction <= 1, "blob_fraction"),
            (0 <= self.cortical_fraction <= 1, "cortical_fraction"),
            (0 <= self.hypo_fraction <= 1, "hypo_fraction"),
            (0 < self.min_contrast <= self.max_contrast < 1, "contrast range"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"bad lesion config {what}: {self}")


@dataclass(frozen=True)
class Lesion:
    """One simulated lesion as placed in a case.

    Attributes:
        centre: centre in voxel coordinates ``(x, y, z)`` of the case.
        diameter_mm: nominal (equivalent) diameter.
        shape: ``"ellipsoid"`` or ``"blob"``.
        contrast: relative intensity change at full occupancy (negative: hypo-intense).
        cortical: placed to reach the brain's outer surface.
        voxels: voxels labelled lesion (after clipping to the brain and the slab).
    """

    centre: tuple[float, float, float]
    diameter_mm: float
    shape: str
    contrast: float
    cortical: bool
    voxels: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SimulatedCase:
    """A case with its simulated lesions.

    Attributes:
        image: ``(X, Y, Z)`` float32, lesions inserted, gain and bias applied.
        label: ``(X, Y, Z)`` uint8, 1 = lesion.
        lesions: the lesions placed, in placement order.
        gain: the case's global gain.
        bias: the bias field's strength ``b``.
    """

    image: np.ndarray
    label: np.ndarray
    lesions: tuple[Lesion, ...]
    gain: float
    bias: float


def brain_depth(brain: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance in mm from every brain voxel to the nearest non-brain voxel (0 outside)."""
    return ndimage.distance_transform_edt(brain, sampling=spacing).astype(np.float32)


def simulate_case(
    image: np.ndarray,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    config: LesionConfig = LesionConfig(),
    depth: np.ndarray | None = None,
) -> SimulatedCase:
    """Insert simulated lesions into ``image`` and apply a case gain and bias field.

    Args:
        image: ``(X, Y, Z)`` brain image, 0 outside the brain.
        spacing: voxel size in mm.
        rng: draws everything about the case.
        config: how lesions are drawn.
        depth: :func:`brain_depth` of ``image > 0``, when the caller has it already (cases
            cut from one slab share it).

    Returns:
        The case (see :class:`SimulatedCase`).
    """
    image = np.asarray(image, dtype=np.float32)
    brain = image > 0
    if depth is None:
        depth = brain_depth(brain, spacing)
    out = image.copy()
    label = np.zeros(image.shape, dtype=np.uint8)
    lesions: list[Lesion] = []
    n = 0 if rng.random() < config.empty_fraction else int(rng.integers(1, config.max_lesions + 1))
    placed: list[tuple[np.ndarray, float]] = []  # centre in mm, radius in mm
    for _ in range(n):
        lesion = _place(out, label, brain, depth, spacing, rng, config, placed)
        if lesion is not None:
            lesions.append(lesion)
    gain = float(rng.uniform(*config.gain_range))
    bias = float(rng.uniform(*config.bias_range))
    out *= gain * _bias_field(brain, bias, rng)
    return SimulatedCase(out.astype(np.float32), label, tuple(lesions), gain, bias)


@dataclass(frozen=True)
class _Shape:
    """A lesion's geometry: semi-axes (mm), rotation and boundary modulation."""

    radius: float
    axes: np.ndarray
    rotation: np.ndarray
    blob: tuple[np.ndarray, ...] | None  # weights, frequencies, normals, phases

    @property
    def inner(self) -> float:
        """Smallest distance from the centre to the boundary, in mm."""
        return float(self.axes.min()) * (1 - BLOB_AMPLITUDE if self.blob else 1.0)

    @property
    def outer(self) -> float:
        """Largest distance from the centre to the boundary, in mm."""
        return float(self.axes.max()) * (1 + BLOB_AMPLITUDE if self.blob else 1.0)


def _draw_shape(radius: float, blob: bool, rng: np.random.Generator) -> _Shape:
    scales = rng.uniform(0.6, 1.0, size=3)
    scales /= np.prod(scales) ** (1 / 3)  # product 1: d stays the equivalent diameter
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    terms = None
    if blob:
        normals = rng.normal(size=(4, 3))
        normals /= np.linalg.norm(normals, axis=1, keepdims=True)
        weights = rng.uniform(0.5, 1.0, size=4)
        terms = (
            weights / weights.sum(),
            rng.integers(1, 4, size=4),
            normals,
            rng.uniform(0, 2 * np.pi, size=4),
        )
    return _Shape(radius, radius * scales, rotation, terms)


def _place(
    image: np.ndarray,
    label: np.ndarray,
    brain: np.ndarray,
    depth: np.ndarray,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    config: LesionConfig,
    placed: list[tuple[np.ndarray, float]],
) -> Lesion | None:
    """Draw one lesion, find it a centre and blend it into ``image`` and ``label`` in place;
    ``None`` when no centre is free (the case then has one lesion fewer)."""
    lo, hi = math.log(config.min_diameter_mm), math.log(config.max_diameter_mm)
    diameter = float(math.exp(rng.uniform(lo, hi)))
    kind = "blob" if rng.random() < config.blob_fraction else "ellipsoid"
    shape = _draw_shape(diameter / 2, kind == "blob", rng)
    cortical = bool(rng.random() < config.cortical_fraction)
    sign = -1.0 if rng.random() < config.hypo_fraction else 1.0
    contrast = sign * float(rng.uniform(config.min_contrast, config.max_contrast))
    if cortical:
        # the centre lies closer to the surface than the boundary does in any direction,
        # so the lesion always reaches the surface (and is clipped there)
        allowed = depth <= max(0.7 * shape.inner, 1.0)
        allowed &= depth > 0
    else:
        allowed = depth >= shape.outer + 1.0
    z_margin = shape.outer / spacing[2]
    z = np.arange(image.shape[2])
    if image.shape[2] > 2 * z_margin:
        allowed &= ((z >= z_margin) & (z <= image.shape[2] - 1 - z_margin))[None, None, :]
    candidates = np.flatnonzero(allowed)
    if candidates.size == 0:
        return None
    sp = np.asarray(spacing, dtype=np.float64)
    for index in rng.choice(candidates, size=min(50, candidates.size), replace=False):
        centre = np.array(np.unravel_index(index, image.shape), dtype=np.float64)
        c_mm = centre * sp
        if all(
            np.linalg.norm(c_mm - other) >= shape.outer + r + MIN_SEPARATION_MM
            for other, r in placed
        ):
            break
    else:
        return None
    occupancy, box = _occupancy(centre, shape, spacing, image.shape)
    occupancy *= brain[box]
    lesion_voxels = occupancy >= 0.5
    label[box][lesion_voxels] = 1
    image[box] *= 1.0 + contrast * occupancy
    placed.append((c_mm, shape.outer))
    return Lesion(
        centre=tuple(float(c) for c in centre),
        diameter_mm=diameter,
        shape=kind,
        contrast=contrast,
        cortical=cortical,
        voxels=int(lesion_voxels.sum()),
    )


def _occupancy(
    centre: np.ndarray, shape: _Shape, spacing: tuple[float, float, float], grid: tuple[int, ...]
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Soft occupancy in [0, 1] of one lesion on the box of ``grid`` around ``centre``."""
    reach = shape.outer + 2.0
    box = tuple(
        slice(max(0, int(math.floor(c - reach / s))), min(n, int(math.ceil(c + reach / s)) + 1))
        for c, s, n in zip(centre, spacing, grid)
    )
    coords = np.meshgrid(
        *[(np.arange(b.start, b.stop) - c) * s for b, c, s in zip(box, centre, spacing)],
        indexing="ij",
    )
    offset = np.stack(coords, axis=-1) @ shape.rotation  # mm, in the lesion's own frame
    rho = np.sqrt(np.sum((offset / shape.axes) ** 2, axis=-1))
    boundary = np.ones_like(rho)
    if shape.blob is not None:
        weights, freq, normals, phase = shape.blob
        direction = offset / np.maximum(np.linalg.norm(offset, axis=-1, keepdims=True), 1e-9)
        g = sum(
            w * np.cos(np.pi * f * (direction @ n) + p)
            for w, f, n, p in zip(weights, freq, normals, phase)
        )
        boundary = 1.0 + BLOB_AMPLITUDE * g
    # signed distance to the boundary in mm, first order in rho: exact for a sphere
    signed = (rho - boundary) * shape.radius
    voxel = float(np.mean(spacing))
    return np.clip(0.5 - signed / voxel, 0.0, 1.0).astype(np.float32), box


def _bias_field(brain: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """``exp(strength * p)``, ``p`` a random polynomial of degree <= 2 in the (centred,
    scaled) voxel coordinates with ``max |p| = 1`` over the brain."""
    if not brain.any():
        return np.ones(brain.shape, dtype=np.float32)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in brain.shape], indexing="ij")
    terms = [*grids] + [a * b for i, a in enumerate(grids) for b in grids[i:]]
    coef = rng.normal(size=len(terms))
    p = sum(c * t for c, t in zip(coef, terms))
    p /= max(float(np.abs(p[brain]).max()), 1e-9)
    return np.exp(strength * p).astype(np.float32)
