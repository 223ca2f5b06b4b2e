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
* ``dsb-nuclei``: the DSB2018 fluorescence-nuclei image and instance mask that stardist's
  wheel carries (512 x 512), with instances merged into a binary nuclei mask, cut into tiles;
  tiles from the left half train, tiles from the right half test. Written as PNG.

Both are written as nnU-Net raw v2 datasets, so every other command reads them like user data.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medflow.data.io import atomic_write
from medflow.errors import MedflowError, OutputExistsError


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    build: Callable[[Path], dict]


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


def build_mni152_tissue(
    out: Path, thickness: int = 12, gap: int = 2, test_every: int = 3, test_offset: int = 2
) -> dict:
    """Write ``mni152-tissue`` to ``out``; returns its ``dataset.json``."""
    import nibabel as nib
    from nilearn import datasets as nd

    t1 = nd.load_mni152_template(resolution=1)
    gm = nd.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = nd.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    image = t1.get_fdata(dtype=np.float32)
    bg = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = np.argmax(np.stack([bg, gm, wm]), axis=0).astype(np.uint8)

    # slabs cover the axial range that holds any tissue label
    z_any = np.flatnonzero(labels.any(axis=(0, 1)))
    slabs = mni152_slabs(image.shape[2], thickness, gap, int(z_any[0]), int(z_any[-1]))
    split = {"train": [], "test": []}
    for dirname in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / dirname).mkdir(parents=True, exist_ok=True)
    for k, (z0, z1) in enumerate(slabs):
        case = f"mni152_slab{k:02d}"
        which = "test" if k % test_every == test_offset else "train"
        suffix = "Ts" if which == "test" else "Tr"
        # shift the origin so each slab sits where it was in the template
        affine = t1.affine @ np.array(
            [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, z0], [0, 0, 0, 1]], dtype=np.float64
        )
        img = nib.Nifti1Image(image[:, :, z0:z1], affine)
        img.set_data_dtype(np.float32)
        lab = nib.Nifti1Image(labels[:, :, z0:z1], affine)
        lab.set_data_dtype(np.uint8)
        atomic_write(
            out / f"images{suffix}" / f"{case}_0000.nii.gz",
            lambda tmp, im=img: nib.save(im, str(tmp)),
        )
        atomic_write(
            out / f"labels{suffix}" / f"{case}.nii.gz", lambda tmp, im=lab: nib.save(im, str(tmp))
        )
        split[which].append({"case": case, "slices": [z0, z1]})

    meta = _dataset_json(
        "T1",
        {"background": 0, "grey_matter": 1, "white_matter": 2},
        len(split["train"]),
        ".nii.gz",
        "MNI152 2009a T1 template (nilearn) with grey/white matter labels from its tissue "
        "probability maps, cut into axial slabs",
        {
            "builtin": "mni152-tissue",
            "slab_thickness": thickness,
            "slab_gap": gap,
            "split": split,
            "source": "nilearn.datasets.load_mni152_template(resolution=1)",
        },
    )
    _write_json(out / "dataset.json", meta)
    return meta


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
    "dsb-nuclei": BuiltinDataset(
        "dsb-nuclei", "DSB2018 fluorescence nuclei, binary, left/right half split", build_dsb_nuclei
    ),
}


def build(name: str, out: str | Path, force: bool = False) -> dict:
    """Build the embedded dataset ``name`` into ``out`` (refusing to overwrite without
    ``force``); files are written into a sibling temporary folder that replaces ``out`` only
    when complete."""
    if name not in BUILTINS:
        raise MedflowError(f"unknown dataset {name!r}; choose one of {', '.join(BUILTINS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(out)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        meta = BUILTINS[name].build(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return meta
