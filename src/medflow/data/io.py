"""Read and write images and label maps: NIfTI (nibabel), PNG (Pillow) and TIFF (tifffile).

Every array is held as a volume so one code path serves 2D and 3D data:

* images are ``(C, X, Y, Z)`` float32, one channel per modality;
* label maps are ``(X, Y, Z)`` int16 with 0 = background.

NIfTI keeps nibabel's voxel order and carries its affine and header, so a label map written
for a NIfTI input lands on the same grid. A PNG of ``H x W`` pixels is the volume
``(H, W, 1)``; an RGB PNG has three channels (alpha is dropped). A TIFF page is likewise
``(H, W, 1)`` and a TIFF stack of ``Z`` pages ``(H, W, Z)``. PNG and TIFF have unit spacing
and an identity affine.

Reading never ends in anything but a volume or one :class:`DataError` line naming the file:
unreadable, truncated or empty files, NaN/Inf, and headers that declare more data than the
file holds are refused, and the readers' own log chatter is kept off the terminal.

Writes are atomic: the file is written beside its target under a temporary name and renamed,
so an interrupted run never leaves a half-written output. :func:`staged_outputs` extends that
to a run that writes several files: they appear together or not at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from medflow.errors import DataError

T = TypeVar("T")

NIFTI_ENDINGS = (".nii.gz", ".nii")
PNG_ENDINGS = (".png",)
TIFF_ENDINGS = (".tif", ".tiff")
SUPPORTED_ENDINGS = NIFTI_ENDINGS + PNG_ENDINGS + TIFF_ENDINGS


def file_ending(path: str | Path) -> str:
    """The supported ending of ``path`` (``.nii.gz``, ``.nii``, ``.png``, ``.tif``, ``.tiff``).

    Raises:
        DataError: the ending is none of these.
    """
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    raise DataError(path, f"unsupported file type; expected one of {', '.join(SUPPORTED_ENDINGS)}")


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels lie: what a written label map must share with its image.

    Attributes:
        shape: spatial shape ``(X, Y, Z)``.
        spacing: voxel size in millimetres (1.0 for PNG and TIFF).
        affine: ``(4, 4)`` voxel-to-world matrix (identity for PNG and TIFF).
        ending: the file ending the volume was read from.
        header: the NIfTI header, or ``None`` for other formats.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray = field(repr=False)
    ending: str
    header: object | None = field(default=None, repr=False, compare=False)

    @property
    def dims(self) -> int:
        """2 for a 2D image (a singleton spatial axis, e.g. ``(H, W, 1)``), else 3."""
        return 2 if 1 in self.shape else 3


@dataclass(frozen=True)
class Volume:
    """An array with the geometry it came with.

    Attributes:
        array: image ``(C, X, Y, Z)`` float32 or label map ``(X, Y, Z)`` int16.
        geometry: grid of the array.
        path: the (first) file it was read from.
    """

    array: np.ndarray
    geometry: Geometry
    path: Path


def _read_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    import nibabel as nib

    img = nib.load(str(path))
    # get_fdata applies scl_slope/inter and forces the lazy read inside the caller's try.
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim == 2:
        data = data[:, :, None, None]
    elif data.ndim == 3:
        data = data[..., None]
    elif data.ndim == 4:
        pass  # Medical Segmentation Decathlon: modalities along the fourth axis
    else:
        raise DataError(path, f"has {data.ndim} dimensions; expected 2, 3 or 4")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    zooms = zooms + (1.0,) * (3 - len(zooms))
    # nibabel already turns negative voxel sizes positive and zero ones into 1; NaN stays
    if not (np.isfinite(zooms).all() and np.isfinite(img.affine).all()):
        raise DataError(
            path, f"header holds a non-finite voxel size {zooms} or orientation (corrupt?)"
        )
    geom = Geometry(
        shape=tuple(int(s) for s in data.shape[:3]),
        spacing=zooms,
        affine=np.asarray(img.affine, dtype=np.float64),
        ending=file_ending(path),
        header=img.header,
    )
    return np.moveaxis(data, -1, 0), geom


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA"):
            im = im.convert("RGB" if im.mode == "RGBA" else "L")
        data = np.asarray(im)
    if data.ndim == 2:
        return data[None, :, :, None].astype(np.float32)
    return np.moveaxis(data, -1, 0)[..., None].astype(np.float32)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ValueError("holds no image")
        series = tif.series[0]
        declared = int(np.prod(series.shape, dtype=object)) * series.dtype.itemsize
        size = path.stat().st_size
        # a damaged header can declare any shape, and tifffile allocates it before reading;
        # uncompressed pixels must fit in the file, and no TIFF codec expands more than 4096:1
        limit = size if series.keyframe.compression == 1 else 4096 * size
        if declared > limit:
            raise ValueError(
                f"header declares {series.shape} {series.dtype} pixels ({declared} bytes) but "
                f"the file holds {size} bytes"
            )
        if series.dtype.kind not in "biuf":
            raise DataError(path, f"TIFF holds {series.dtype} pixels; expected integers or reals")
        data = series.asarray()
    if data.ndim == 2:
        return data[None, :, :, None].astype(np.float32)
    if data.ndim == 3 and data.shape[-1] in (3, 4) and data.shape[0] > 4:
        return np.moveaxis(data[..., :3], -1, 0)[..., None].astype(np.float32)
    if data.ndim == 3:
        # a stack of Z pages (Z, H, W) -> one channel (H, W, Z)
        return np.moveaxis(data, 0, -1)[None].astype(np.float32)
    raise DataError(path, f"TIFF has shape {data.shape}; expected a 2D page or a stack of pages")


# loggers of the readers: nibabel reports the header fixes it makes, tifffile every oddity
_READER_LOGGERS = ("nibabel.global", "tifffile")


@contextlib.contextmanager
def _quiet_readers() -> Iterator[None]:
    """Keep the readers' log lines and warnings off the terminal: a file is either read or
    refused with one DataError line, never followed by a stream of notes."""
    loggers = [logging.getLogger(name) for name in _READER_LOGGERS]
    before = [logger.disabled for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.disabled = True
        try:
            yield
        finally:
            for logger, disabled in zip(loggers, before):
                logger.disabled = disabled


def _read_any(path: Path) -> tuple[np.ndarray, Geometry]:
    """Read one file as ``(C, X, Y, Z)`` float32 with its geometry."""
    if not path.is_file():
        raise DataError(path, "file not found")
    ending = file_ending(path)
    try:
        with _quiet_readers():
            if ending in NIFTI_ENDINGS:
                data, geom = _read_nifti(path)
            else:
                data = _read_png(path) if ending in PNG_ENDINGS else _read_tiff(path)
                geom = Geometry(
                    shape=tuple(int(s) for s in data.shape[1:]),
                    spacing=(1.0, 1.0, 1.0),
                    affine=np.eye(4),
                    ending=ending,
                )
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one clear line
        kind = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}.get(ending, "NIfTI")
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # the message starts with the path already; readers tend to repeat it
        detail = detail.replace(str(path), path.name)[:200]
        raise DataError(
            path, f"cannot be read as {kind} (corrupt or truncated?): {detail}"
        ) from exc
    if data.size == 0:
        raise DataError(path, f"holds no voxels (shape {geom.shape}, {data.shape[0]} channels)")
    return data, geom


def read_image(paths: Sequence[str | Path]) -> Volume:
    """Read one case's image, one file per channel group, as ``(C, X, Y, Z)`` float32.

    Args:
        paths: the case's files in channel order (nnU-Net's ``_0000``, ``_0001``, ...); a file
            may hold several channels (RGB PNG, 4D NIfTI).

    Raises:
        DataError: a file is missing, unreadable, holds NaN/Inf, or its grid differs from the
            first file's.
    """
    if not paths:
        raise DataError(".", "no image files given")
    arrays, first = [], None
    for p in map(Path, paths):
        data, geom = _read_any(p)
        if not np.isfinite(data).all():
            raise DataError(p, "contains NaN or Inf values")
        if first is None:
            first = geom
        elif geom.shape != first.shape:
            raise DataError(p, f"has spatial shape {geom.shape} but {paths[0]} has {first.shape}")
        arrays.append(data)
    return Volume(np.concatenate(arrays, axis=0), first, Path(paths[0]))


def read_label(path: str | Path) -> Volume:
    """Read an integer label map as ``(X, Y, Z)`` int16.

    Raises:
        DataError: unreadable, more than one channel, or values that are not non-negative
            integers.
    """
    path = Path(path)
    data, geom = _read_any(path)
    if data.shape[0] != 1:
        raise DataError(path, f"label map has {data.shape[0]} channels; expected 1")
    data = data[0]
    if not np.isfinite(data).all():
        raise DataError(path, "label map contains NaN or Inf values")
    rounded = np.rint(data)
    if not np.array_equal(rounded, data) or rounded.min() < 0 or rounded.max() > 32767:
        raise DataError(path, "label map must hold non-negative integers (0 = background)")
    return Volume(rounded.astype(np.int16), geom, path)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place.

    The temporary name keeps ``path``'s ending, so writers that pick a format by extension work.
    """
    path = Path(path)
    ending = next((e for e in SUPPORTED_ENDINGS if path.name.lower().endswith(e)), path.suffix)
    stem = path.name[: len(path.name) - len(ending)] if ending else path.name
    tmp = path.with_name(f".{stem}.partial-{os.getpid()}{ending}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno is None:
            raise
        # name the file the caller asked for, not our temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextlib.contextmanager
def staged_outputs(out_dir: str | Path) -> Iterator[Path]:
    """A hidden folder inside ``out_dir`` for one run's outputs, which appear all together.

    Files written into the yielded folder are moved into ``out_dir`` (``os.replace``: same
    file system, one rename each) once the block has finished. If the block raises, the
    folder is deleted, and so is ``out_dir`` where this call created it, so a failed run
    leaves nothing behind. The folder's name is unique, so concurrent runs (one per rank)
    may share ``out_dir``.

    Raises:
        DataError: ``out_dir`` is a file or cannot be created, or a move fails.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "is a file; expected an output folder")
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".medflow-partial-", dir=out_dir))
    except OSError as exc:
        raise DataError(out_dir, f"cannot create output folder: {exc.strerror or exc}") from exc
    done = False
    try:
        yield stage
        for staged in sorted(stage.iterdir()):
            target = out_dir / staged.name
            try:
                os.replace(staged, target)
            except OSError as exc:
                raise DataError(target, f"cannot be written: {exc.strerror or exc}") from exc
        done = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not done:
            for folder in created:  # innermost first; only folders left empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


def build_folder(out: str | Path, write: Callable[[Path], T]) -> T:
    """Fill a new folder with ``write(folder)`` and put it at ``out`` only once complete.

    ``write`` fills a hidden sibling ``.<name>.partial``; on success it replaces ``out`` (an
    earlier folder there is removed first: callers check ``--force`` before), on failure it
    is deleted, so ``out`` is either the whole new folder or left as it was.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        result = write(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return result


def write_volume(path: str | Path, array: np.ndarray, geometry: Geometry) -> Path:
    """Write a label map ``(X, Y, Z)`` or single-channel map on ``geometry``'s grid.

    The format follows ``path``'s ending. NIfTI copies the reference affine and header (so
    the output overlays the input in any viewer); PNG needs ``Z == 1`` and integer data in
    0..65535; TIFF writes one page per ``Z``.

    Raises:
        DataError: the array's shape differs from ``geometry.shape`` or cannot be stored in
            the chosen format.
    """
    path = Path(path)
    ending = file_ending(path)
    array = np.asarray(array)
    if tuple(array.shape) != tuple(geometry.shape):
        raise DataError(path, f"array shape {array.shape} does not match grid {geometry.shape}")
    integer = np.issubdtype(array.dtype, np.integer)
    if integer:
        array = array.astype(np.uint8 if array.max(initial=0) < 256 else np.uint16)
    else:
        array = array.astype(np.float32)

    if ending in NIFTI_ENDINGS:
        import nibabel as nib

        header = geometry.header.copy() if geometry.header is not None else None
        img = nib.Nifti1Image(array, geometry.affine, header=header)
        img.set_data_dtype(array.dtype)
        # the reference may be a scaled float image; a label map must be stored unscaled
        img.header.set_slope_inter(1.0, 0.0)
        return atomic_write(path, lambda tmp: nib.save(img, str(tmp)))
    if ending in PNG_ENDINGS:
        from PIL import Image

        if array.shape[2] != 1 or not integer:
            raise DataError(path, "PNG holds one 2D integer plane; use NIfTI or TIFF for this")
        plane = array[:, :, 0]
        return atomic_write(path, lambda tmp: Image.fromarray(plane).save(tmp, format="PNG"))
    import tifffile

    pages = np.moveaxis(array, -1, 0)
    data = pages[0] if pages.shape[0] == 1 else pages
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data))
