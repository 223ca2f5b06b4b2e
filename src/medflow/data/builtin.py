"""Embedded datasets, built from files that installed packages carry (no download at run time).

* ``mni152-tissue``: nilearn's MNI152 2009a T1 template (1 mm, skull-stripped) with labels
  background / grey matter / white matter taken as the argmax of
  ``(1 - p_gm - p_wm, p_gm, p_wm)`` over nilearn's tissue probability maps. The one volume is
  cut into axial slabs; a gap of discarded slices separates every pair of neighbouring slabs,
  so no two cases share neighbouring slices and any split by case is free of slice leakage.
  Every third slab, starting from the third (slabs 2, 5, 8 of 11), is held out as the test
  split (``imagesTs``/``labelsTs``): placed symmetrically, they sample inferior, middle and
  superior anatomy, while the outermost slabs, where a class can have a few hundred voxels
  in a whole slab and Dice hinges on a handful of them, stay in training.
* ``mni152-tissue-shifted``: the same slabs, labels and split, every slab's image passed
  through a simulated acquisition shift (:mod:`medflow.data.shift`, site ``"site-b"``, one
  seed per slab) as a target site for domain alignment; ``references/`` holds unlabelled
  target-site slices of training slabs, ordered so that the first K spread over the brain,
  each stored as its whole slab with the slice named in ``references/slices.json``.
* ``mni152-tissue-site-c``: built as ``mni152-tissue-shifted`` (same slabs, labels, split,
  seeds and references), through site ``"site-c"``, a shift of another kind (non-monotone
  contrast curve, Gibbs ringing, motion ghosts, Rician noise), so that a method is not
  measured against one shift only.
* ``mni152-raters``: ``mni152-tissue``'s slabs and split with several annotations per case
  from SIMULATED raters (:mod:`medflow.data.raters`) whose per-voxel label law is exactly
  the renormalised tissue probabilities ``(bg, p_gm, p_wm)``; each rater is drawn once on
  the whole template, so it is coherent across slabs. ``labels{Tr,Ts}`` hold rater 0,
  ``raters{Tr,Ts}/{case}_raterNN`` the others, ``probabilities{Tr,Ts}/{case}`` the
  ``(X, Y, Z, K)`` float32 distribution the raters sample.
* ``mni152-lesions``: axial slabs of the same T1 (32 slices, gaps of 8), each case with its
  own SIMULATED lesions (:mod:`medflow.data.lesions`: ellipsoids and blobs of 3-30 mm,
  hypo- or hyper-intense, some reaching the cortex, some cases without any) and its own
  gain and bias field; binary labels; the test cases come from their own slab.
* ``dsb-nuclei``: the DSB2018 fluorescence-nuclei image and instance mask that stardist's
  wheel carries (512 x 512), with instances merged into a binary nuclei mask, cut into tiles;
  tiles from the left half train, tiles from the right half test. Written as PNG.

All are written as nnU-Net raw v2 datasets, so every other command reads them like user data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from medflow.data.io import atomic_write, build_folder
from medflow.data.lesions import LesionConfig, SimulatedCase, brain_depth, simulate_case
from medflow.errors import MedflowError, OutputExistsError

# in a references folder: which slices of each (volume) file are the reference images,
# ``{"slice_axis": a, "slices": {file name: [index along a, ...]}}``; read by
# ``medflow.synthesis.align.read_references``
REFERENCE_SLICES = "slices.json"


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    build: Callable[..., dict]


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def _dataset_json(
    channel: str, labels: dict[str, int], n_train: int, ending: str, description: str, extra: dict
) -> dict:
    return {
        "channel_names": {"0": channel},
        "labels": labels,
        "numTraining": n_train,
        "file_ending": ending,
        "description": description,
        "medflow": extra,
    }


def mni152_slabs(
    depth: int, thickness: int, gap: int, first: int, last: int
) -> list[tuple[int, int]]:
    """Half-open slice ranges ``[start, stop)`` of slabs covering ``first..last`` inclusive,
    each ``thickness`` slices, separated by ``gap`` discarded slices; a final slab shorter
    than half the thickness is dropped."""
    if thickness < 1 or gap < 0 or not 0 <= first <= last < depth:
        raise ValueError(
            f"bad slab layout thickness={thickness} gap={gap} range={first}..{last} depth={depth}"
        )
    slabs, start = [], first
    while start <= last:
        stop = min(start + thickness, last + 1)
        if stop - start >= max(1, thickness // 2):
            slabs.append((start, stop))
        start = stop + gap
    return slabs


@dataclass(frozen=True)
class _Slab:
    """One slab of the MNI152 template: its place, split, voxels and (origin-shifted) affine."""

    index: int
    case: str
    z0: int
    z1: int
    split: str  # "train" or "test"
    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    probabilities: np.ndarray  # (3, X, Y, Z): background, grey matter, white matter


@dataclass(frozen=True)
class _Template:
    """nilearn's MNI152 T1 template and its tissue model on the 1 mm grid.

    Attributes:
        image: ``(X, Y, Z)`` float32 T1 intensities.
        labels: ``(X, Y, Z)`` uint8 argmax labels (background, grey matter, white matter).
        probabilities: ``(3, X, Y, Z)`` float32 ``(bg, p_gm, p_wm)``, ``bg = 1 - p_gm - p_wm``
            clipped to ``[0, 1]``, the three renormalised to sum to 1 at every voxel.
        affine: the template's voxel-to-world affine.
    """

    image: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm per axis."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def _mni152_template() -> _Template:
    """Load nilearn's MNI152 2009a T1 template with its grey/white matter probability maps."""
    from nilearn import datasets as nd

    t1 = nd.load_mni152_template(resolution=1)
    gm = nd.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = nd.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    stacked = np.stack([np.clip(1.0 - gm - wm, 0.0, 1.0), gm, wm])
    # labels from the unnormalised stack, as mni152-tissue has always had them
    labels = np.argmax(stacked, axis=0).astype(np.uint8)
    probabilities = (stacked / stacked.sum(axis=0, keepdims=True)).astype(np.float32)
    return _Template(t1.get_fdata(dtype=np.float32), labels, probabilities, t1.affine)


def _z_affine(affine: np.ndarray, z: int) -> np.ndarray:
    """``affine`` with its origin moved to slice ``z``, so a cut keeps its place in the template."""
    return affine @ np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, z], [0, 0, 0, 1]], dtype=np.float64
    )


def _mni152_cut(
    thickness: int,
    gap: int,
    test_every: int,
    test_offset: int,
    template: _Template | None = None,
) -> list[_Slab]:
    """Cut the MNI152 template (``template``, or nilearn's loaded afresh) into slabs, every
    ``test_every``-th from ``test_offset`` in the test split; a slab's arrays are views."""
    t = _mni152_template() if template is None else template
    # slabs cover the axial range that holds any tissue label
    z_any = np.flatnonzero(t.labels.any(axis=(0, 1)))
    ranges = mni152_slabs(t.image.shape[2], thickness, gap, int(z_any[0]), int(z_any[-1]))
    return [
        _Slab(
            index=k,
            case=f"mni152_slab{k:02d}",
            z0=z0,
            z1=z1,
            split="test" if k % test_every == test_offset else "train",
            image=t.image[:, :, z0:z1],
            labels=t.labels[:, :, z0:z1],
            affine=_z_affine(t.affine, z0),
            probabilities=t.probabilities[..., z0:z1],
        )
        for k, (z0, z1) in enumerate(ranges)
    ]


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


def _write_slabs(out: Path, slabs: list[_Slab], images: list[np.ndarray]) -> dict:
    """Write each slab's image (``images``, in slab order) and labels into the nnU-Net
    folders; returns the split record ``{"train": [...], "test": [...]}``."""
    split = {"train": [], "test": []}
    for dirname in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / dirname).mkdir(parents=True, exist_ok=True)
    for slab, image in zip(slabs, images, strict=True):
        suffix = "Ts" if slab.split == "test" else "Tr"
        _save_nifti(
            out / f"images{suffix}" / f"{slab.case}_0000.nii.gz",
            image.astype(np.float32),
            slab.affine,
        )
        _save_nifti(out / f"labels{suffix}" / f"{slab.case}.nii.gz", slab.labels, slab.affine)
        split[slab.split].append({"case": slab.case, "slices": [slab.z0, slab.z1]})
    return split


MNI152_LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}
MNI152_SOURCE = "nilearn.datasets.load_mni152_template(resolution=1)"


def build_mni152_tissue(
    out: Path, thickness: int = 12, gap: int = 2, test_every: int = 3, test_offset: int = 2
) -> dict:
    """Write ``mni152-tissue`` to ``out``; returns its ``dataset.json``."""
    slabs = _mni152_cut(thickness, gap, test_every, test_offset)
    split = _write_slabs(out, slabs, [s.image for s in slabs])
    meta = _dataset_json(
        "T1",
        MNI152_LABELS,
        len(split["train"]),
        ".nii.gz",
        "MNI152 2009a T1 template (nilearn) with grey/white matter labels from its tissue "
        "probability maps, cut into axial slabs",
        {
            "builtin": "mni152-tissue",
            "slab_thickness": thickness,
            "slab_gap": gap,
            "split": split,
            "source": MNI152_SOURCE,
        },
    )
    _write_json(out / "dataset.json", meta)
    return meta


def _write_raters(out: Path, slabs: list[_Slab], raters: np.ndarray) -> None:
    """Write raters ``1..R-1`` of each slab (``raters``: ``(R, X, Y, Z)`` on the whole
    template) to ``raters{Tr,Ts}/{case}_raterNN.nii.gz`` and its probabilities, ``(X, Y, Z, K)``
    float32, to ``probabilities{Tr,Ts}/{case}.nii.gz``."""
    for dirname in ("ratersTr", "ratersTs", "probabilitiesTr", "probabilitiesTs"):
        (out / dirname).mkdir(parents=True, exist_ok=True)
    for slab in slabs:
        suffix = "Ts" if slab.split == "test" else "Tr"
        for r in range(1, raters.shape[0]):
            _save_nifti(
                out / f"raters{suffix}" / f"{slab.case}_rater{r:02d}.nii.gz",
                np.ascontiguousarray(raters[r, :, :, slab.z0 : slab.z1]),
                slab.affine,
            )
        _save_nifti(
            out / f"probabilities{suffix}" / f"{slab.case}.nii.gz",
            np.ascontiguousarray(np.moveaxis(slab.probabilities, 0, -1), dtype=np.float32),
            slab.affine,
        )


def build_mni152_raters(
    out: Path,
    raters: int = 8,
    correlation_mm: float = 4.0,
    seed: int = 0,
    thickness: int = 12,
    gap: int = 2,
    test_every: int = 3,
    test_offset: int = 2,
) -> dict:
    """Write ``mni152-raters`` to ``out``: ``mni152-tissue``'s slabs, images and split with
    ``raters`` simulated annotations per case (:func:`medflow.data.raters.simulate_raters`
    on the whole template, noise smoothed over ``correlation_mm``, seeded by ``seed``);
    rater 0 in ``labels{Tr,Ts}``, the others in ``raters{Tr,Ts}``, the label distribution
    in ``probabilities{Tr,Ts}``; returns its ``dataset.json``.

    Raises:
        MedflowError: ``raters`` below 2 or ``correlation_mm`` negative.
    """
    from medflow.data.raters import simulate_raters

    if isinstance(raters, bool) or not isinstance(raters, int) or raters < 2:
        raise MedflowError(f"--raters must be an integer of at least 2, got {raters!r}")
    if not np.isfinite(correlation_mm) or correlation_mm < 0:
        raise MedflowError(f"--correlation-mm must be a length >= 0 in mm, got {correlation_mm}")
    template = _mni152_template()
    drawn = simulate_raters(
        template.probabilities,
        raters,
        correlation_mm,
        template.spacing,
        np.random.default_rng(seed),
    )
    slabs = [
        replace(s, labels=drawn[0, :, :, s.z0 : s.z1])
        for s in _mni152_cut(thickness, gap, test_every, test_offset, template)
    ]
    split = _write_slabs(out, slabs, [s.image for s in slabs])
    _write_raters(out, slabs, drawn)
    meta = _dataset_json(
        "T1",
        MNI152_LABELS,
        len(split["train"]),
        ".nii.gz",
        f"MNI152 2009a T1 template (nilearn) cut into axial slabs as mni152-tissue, with "
        f"{raters} SIMULATED raters per case: the anatomy and the grey/white matter "
        "probability maps are real, the annotations are not. Every rater labels each voxel "
        "with exactly the probabilities in probabilities{Tr,Ts} (background, grey matter, "
        f"white matter), through Gaussian noise smoothed over {correlation_mm:g} mm, so a "
        "rater is locally liberal or conservative (see medflow.data.raters). labels{Tr,Ts} "
        "hold rater 0, raters{Tr,Ts}/{case}_raterNN the others.",
        {
            "builtin": "mni152-raters",
            "slab_thickness": thickness,
            "slab_gap": gap,
            "split": split,
            "source": MNI152_SOURCE,
            "raters": raters,
            "rater_correlation_mm": correlation_mm,
            "rater_seed": seed,
            "simulated_raters": "medflow.data.raters.simulate_raters",
            "rater_files": f"raters{{Tr,Ts}}/{{case}}_rater01..{raters - 1:02d}.nii.gz",
            "probability_files": "probabilities{Tr,Ts}/{case}.nii.gz, (X, Y, Z, K) float32",
        },
    )
    _write_json(out / "dataset.json", meta)
    return meta


def reference_order(slices: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """``n`` of ``slices`` (``(slab, z)`` pairs sorted by z) in an order whose every prefix
    spreads over the range: the i-th pick sits at the i-th point of the base-2 van der Corput
    sequence (1/2, 1/4, 3/4, 1/8, 5/8, 3/8, 7/8, 1/16, ...), as a fraction of the way
    through ``slices``. The first is the middle one; the first K fill the gaps the first
    K - 1 left, largest first."""
    if not 0 <= n <= len(slices):
        raise ValueError(f"cannot pick {n} of {len(slices)} slices")
    picks: list[tuple[int, int]] = []
    i = 1
    while len(picks) < n:
        q, f, k = 0.0, 0.5, i
        while k:
            q, f, k = q + f * (k & 1), f / 2, k >> 1
        pick = slices[min(int(q * len(slices)), len(slices) - 1)]
        if pick not in picks:  # a fine sequence on few slices can land on one twice
            picks.append(pick)
        i += 1
    return picks


def _write_references(
    folder: Path, slabs: list[_Slab], images: list[np.ndarray], picks: list[tuple[int, int]]
) -> list[dict]:
    """Write reference ``i`` (slab ``k``, template slice ``z`` of ``picks[i]``) as the whole
    slab ``images[k]`` in ``folder/ref_{i:02d}_0000.nii.gz`` and name its slice in
    ``folder/slices.json`` (:data:`REFERENCE_SLICES`): a reader that prepares the file as
    the segmenter prepares a scan (crop to the slab's nonzero box, z-score over the slab)
    and then keeps that slice sees the reference exactly as it would appear in a target
    scan. A lone slice file would be cropped and normalised on its own instead, blowing a
    peripheral slice up to the full frame. Returns the references' records."""
    folder.mkdir(parents=True, exist_ok=True)
    records, chosen = [], {}
    for i, (k, z) in enumerate(picks):
        slab = slabs[k]
        name = f"ref_{i:02d}_0000.nii.gz"
        _save_nifti(folder / name, images[k].astype(np.float32), slab.affine)
        chosen[name] = [z - slab.z0]
        records.append({"file": f"references/{name}", "case": slab.case, "slab": k, "slice": z})
    _write_json(folder / REFERENCE_SLICES, {"slice_axis": 2, "slices": chosen})
    return records


# simulated target sites with an embedded dataset: site -> (dataset name, what the shift
# does, for its description)
SHIFTED_SITES = {
    "site-b": (
        "mni152-tissue-shifted",
        "contrast change, bias field, noise, coarser in-plane resolution",
    ),
    "site-c": (
        "mni152-tissue-site-c",
        "non-monotone contrast curve, Gibbs ringing, motion ghosts, Rician noise",
    ),
}


def build_mni152_tissue_shifted(
    out: Path,
    site: str = "site-b",
    thickness: int = 12,
    gap: int = 2,
    test_every: int = 3,
    test_offset: int = 2,
    n_references: int = 10,
) -> dict:
    """Write the target-site dataset of ``site`` (``SHIFTED_SITES``: ``mni152-tissue-shifted``
    for ``"site-b"``, ``mni152-tissue-site-c`` for ``"site-c"``) to ``out``:
    ``mni152-tissue``'s slabs, labels and split, each slab's image through the simulated
    acquisition shift ``SITES[site]`` (seeded by the slab's index, so every slab is a
    different "scan"), plus ``n_references`` unlabelled target-site slices of training slabs
    in ``references/`` (each as its slab, the slice named in ``slices.json``:
    :func:`_write_references`); returns its ``dataset.json``."""
    from medflow.data.shift import SITES, apply_shift

    if site not in SHIFTED_SITES:
        raise MedflowError(f"unknown site {site!r}; choose one of {', '.join(SHIFTED_SITES)}")
    name, components = SHIFTED_SITES[site]
    shift = SITES[site]
    slabs = _mni152_cut(thickness, gap, test_every, test_offset)
    shifted = [apply_shift(s.image, shift, np.random.default_rng(s.index)) for s in slabs]
    split = _write_slabs(out, slabs, shifted)

    # references: target-site slices of training slabs only, never of test slabs
    train_slices = [
        (k, z) for k, s in enumerate(slabs) if s.split == "train" for z in range(s.z0, s.z1)
    ]
    picks = reference_order(train_slices, n_references)
    references = _write_references(out / "references", slabs, shifted, picks)

    meta = _dataset_json(
        "T1",
        MNI152_LABELS,
        len(split["train"]),
        ".nii.gz",
        f"mni152-tissue under a simulated acquisition shift ({site}: {components}; see "
        "medflow.data.shift): the same anatomy, labels and split. imagesTs/labelsTs are "
        "the target-site test set (evaluation only); labelsTr serve only an oracle upper "
        "bound (training on labelled target data); references/ holds unlabelled target-site "
        "slices of training slabs (the first K files are the K-shot references).",
        {
            "builtin": name,
            "slab_thickness": thickness,
            "slab_gap": gap,
            "split": split,
            "source": MNI152_SOURCE,
            "site": site,
            "simulated_shift": shift.to_dict(),
            "shift_seed": "slab index: numpy.random.default_rng(slab)",
            "references": references,
        },
    )
    _write_json(out / "dataset.json", meta)
    return meta


LESION_LABELS = {"background": 0, "lesion": 1}
INTENSITY_SCALE = 1000.0  # mni152-lesions images: int16, the T1's [0, 1] x 1000


def _mni152_t1() -> tuple[np.ndarray, np.ndarray]:
    """nilearn's MNI152 2009a T1 at 1 mm, ``(X, Y, Z)`` float32, and its affine (without the
    tissue maps, which ``mni152-lesions`` does not need)."""
    from nilearn import datasets as nd

    t1 = nd.load_mni152_template(resolution=1)
    return t1.get_fdata(dtype=np.float32), t1.affine


def build_mni152_lesions(
    out: Path,
    train_cases: int = 24,
    test_cases: int = 8,
    seed: int = 0,
    thickness: int = 32,
    gap: int = 8,
    test_slabs: tuple[int, ...] = (2,),
    config: LesionConfig | None = None,
) -> dict:
    """Write ``mni152-lesions`` to ``out``: cases cut from axial slabs of the real MNI152 T1
    (1 mm), each with its own SIMULATED lesions, gain and bias field
    (:func:`medflow.data.lesions.simulate_case`), binary labels; returns its
    ``dataset.json``.

    The slabs (``thickness`` slices, ``gap`` discarded between neighbours) of
    ``test_slabs`` give the test cases, the others the training cases, so no training case
    shares or neighbours a slice of a test case; cases go round their split's slabs in turn.
    Case ``i`` (over both splits) draws from ``numpy.random.default_rng([seed, i])``.

    Raises:
        MedflowError: a case count below 1, or ``test_slabs`` leaving no slab for a split.
    """
    config = LesionConfig() if config is None else config
    for name, n in (("train_cases", train_cases), ("test_cases", test_cases)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise MedflowError(f"{name} must be an integer of at least 1, got {n!r}")
    image, affine = _mni152_t1()
    z_any = np.flatnonzero((image > 0).any(axis=(0, 1)))
    ranges = mni152_slabs(image.shape[2], thickness, gap, int(z_any[0]), int(z_any[-1]))
    test = [k for k in range(len(ranges)) if k in test_slabs]
    train = [k for k in range(len(ranges)) if k not in test_slabs]
    if not test or not train:
        raise MedflowError(
            f"test slabs {list(test_slabs)} of {len(ranges)} leave no slab for a split"
        )
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    depths: dict[int, np.ndarray] = {}
    for dirname in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / dirname).mkdir(parents=True, exist_ok=True)
    split: dict[str, list] = {"train": [], "test": []}
    plan = [("train", train[i % len(train)]) for i in range(train_cases)]
    plan += [("test", test[i % len(test)]) for i in range(test_cases)]
    for i, (which, k) in enumerate(plan):
        z0, z1 = ranges[k]
        slab = np.ascontiguousarray(image[:, :, z0:z1])
        if k not in depths:  # cases of one slab share its brain mask
            depths[k] = brain_depth(slab > 0, spacing)
        case = simulate_case(slab, spacing, np.random.default_rng([seed, i]), config, depths[k])
        record = _write_lesion_case(out, f"lesions_{i:03d}", which, case, _z_affine(affine, z0))
        split[which].append({**record, "slab": k, "slices": [z0, z1]})
    meta = _dataset_json(
        "T1",
        LESION_LABELS,
        len(split["train"]),
        ".nii.gz",
        "MNI152 2009a T1 template (nilearn, real anatomy at 1 mm) cut into axial slabs, with "
        "SIMULATED lesions: ellipsoids and irregular blobs of "
        f"{config.min_diameter_mm:g}-{config.max_diameter_mm:g} mm, hypo- and hyper-intense, "
        "some reaching the cortex, some cases without any, each case with its own gain and "
        "bias field (see medflow.data.lesions). No real lesion is involved.",
        {
            "builtin": "mni152-lesions",
            "slab_thickness": thickness,
            "slab_gap": gap,
            "test_slabs": sorted(test),
            "slabs": [list(r) for r in ranges],
            "seed": seed,
            "intensity_scale": INTENSITY_SCALE,
            "simulated_lesions": {
                k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()
            },
            "split": split,
            "source": MNI152_SOURCE,
        },
    )
    _write_json(out / "dataset.json", meta)
    return meta


def _write_lesion_case(
    out: Path, name: str, which: str, case: SimulatedCase, affine: np.ndarray
) -> dict:
    """Write one ``mni152-lesions`` case's image and label; returns its ``dataset.json``
    record (gain, bias, lesions)."""
    suffix = "Tr" if which == "train" else "Ts"
    # int16 in thousandths of the template's [0, 1] scale: finer than its 8-bit source,
    # and 2.5x smaller on disk than float32 once the bias field makes every voxel unique
    stored = np.round(case.image * INTENSITY_SCALE).astype(np.int16)
    _save_nifti(out / f"images{suffix}" / f"{name}_0000.nii.gz", stored, affine)
    _save_nifti(out / f"labels{suffix}" / f"{name}.nii.gz", case.label, affine)
    return {
        "case": name,
        "gain": round(case.gain, 4),
        "bias": round(case.bias, 4),
        "lesions": [
            {**lesion.to_dict(), "centre": [round(c, 1) for c in lesion.centre]}
            for lesion in case.lesions
        ],
    }


def _stardist_file(name: str) -> Path:
    """Locate a data file in the installed stardist distribution without importing it
    (importing stardist would pull TensorFlow-era dependencies we do not need)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("stardist")
    except metadata.PackageNotFoundError as exc:
        raise MedflowError(
            "dsb-nuclei needs the stardist wheel's data files: "
            "pip install --no-deps stardist==0.9.2"
        ) from exc
    path = Path(dist.locate_file(f"stardist/data/images/{name}"))
    if not path.is_file():
        raise MedflowError(f"{path}: missing from the installed stardist package")
    return path


def build_dsb_nuclei(out: Path, tile: int = 128) -> dict:
    """Write ``dsb-nuclei`` to ``out`` as PNG tiles; returns its ``dataset.json``."""
    import tifffile
    from PIL import Image

    image = tifffile.imread(_stardist_file("img2d.tif"))
    mask = (tifffile.imread(_stardist_file("mask2d.tif")) > 0).astype(np.uint8)
    # 16-bit source with a small range: stretch to 8 bits so PNG viewers show it
    lo, hi = np.percentile(image, [0.1, 99.9])
    image8 = np.clip((image - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)
    h, w = image.shape
    split = {"train": [], "test": []}
    for dirname in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / dirname).mkdir(parents=True, exist_ok=True)
    for y in range(0, h - tile + 1, tile):
        for x in range(0, w - tile + 1, tile):
            which = "train" if x + tile <= w // 2 else "test"
            suffix = "Tr" if which == "train" else "Ts"
            case = f"dsb_y{y:03d}_x{x:03d}"
            img_t = image8[y : y + tile, x : x + tile]
            lab_t = mask[y : y + tile, x : x + tile]
            atomic_write(
                out / f"images{suffix}" / f"{case}_0000.png",
                lambda tmp, a=img_t: Image.fromarray(a).save(tmp, format="PNG"),
            )
            atomic_write(
                out / f"labels{suffix}" / f"{case}.png",
                lambda tmp, a=lab_t: Image.fromarray(a).save(tmp, format="PNG"),
            )
            split[which].append({"case": case, "origin": [y, x]})
    meta = _dataset_json(
        "fluorescence",
        {"background": 0, "nucleus": 1},
        len(split["train"]),
        ".png",
        "DSB2018 fluorescence nuclei (stardist's packaged example), binary mask, "
        "left half train / right half test",
        {
            "builtin": "dsb-nuclei",
            "tile": tile,
            "split": split,
            "source": "stardist/data/images/img2d.tif, mask2d.tif",
        },
    )
    _write_json(out / "dataset.json", meta)
    return meta


BUILTINS = {
    "mni152-tissue": BuiltinDataset(
        "mni152-tissue",
        "MNI152 T1, background / grey matter / white matter, test by slab",
        build_mni152_tissue,
    ),
    "mni152-tissue-shifted": BuiltinDataset(
        "mni152-tissue-shifted",
        "mni152-tissue under a simulated acquisition shift (site-b), with 10 unlabelled "
        "target-site reference slices",
        build_mni152_tissue_shifted,
    ),
    "mni152-tissue-site-c": BuiltinDataset(
        "mni152-tissue-site-c",
        "mni152-tissue under a second simulated shift of another kind (site-c: non-monotone "
        "contrast, ringing, ghosts, Rician noise), with 10 unlabelled reference slices",
        partial(build_mni152_tissue_shifted, site="site-c"),
    ),
    "mni152-raters": BuiltinDataset(
        "mni152-raters",
        "mni152-tissue slabs with 8 simulated raters of known per-voxel label distribution",
        build_mni152_raters,
    ),
    "mni152-lesions": BuiltinDataset(
        "mni152-lesions",
        "MNI152 T1 slabs at 1 mm with simulated lesions of 3-30 mm (3D, binary), test by slab",
        build_mni152_lesions,
    ),
    "dsb-nuclei": BuiltinDataset(
        "dsb-nuclei", "DSB2018 fluorescence nuclei, binary, left/right half split", build_dsb_nuclei
    ),
}


def build(name: str, out: str | Path, force: bool = False, **options: object) -> dict:
    """Build the embedded dataset ``name`` into ``out`` (refusing to overwrite without
    ``force``); files are written into a sibling temporary folder that replaces ``out`` only
    when complete. ``options`` go to the dataset's builder (e.g. ``raters=4`` for
    ``mni152-raters``)."""
    if name not in BUILTINS:
        raise MedflowError(f"unknown dataset {name!r}; choose one of {', '.join(BUILTINS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(out)
    return build_folder(out, lambda folder: BUILTINS[name].build(folder, **options))


def built(name: str, out: str | Path) -> Path:
    """``out`` holding the embedded dataset ``name``: built there unless a dataset already
    is (what the benchmarks' default ``--data`` does)."""
    out = Path(out)
    if not (out / "dataset.json").is_file():
        build(name, out, force=True)
    return out
