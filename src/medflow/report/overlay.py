"""Overlays of image, reference, prediction and uncertainty for one slice of a case.

The slice is cut across the coarsest axis (as training slices are, for anisotropic scans)
where the reference holds the most foreground, so the structure is in view; NIfTI slices
are turned so that the second voxel axis points up, as viewers show axial slices.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from medflow.data.io import NIFTI_ENDINGS, atomic_write, file_ending, read_image, read_label
from medflow.data.transforms import choose_slice_axis
from medflow.errors import DataError, OutputExistsError
from medflow.report.cases import CaseRecord, collect, read_map
from medflow.uncertainty.maps import png_scale

# label colours (tab10 without its grey), cycled for more classes
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def _slice_index(ref: np.ndarray, pred: np.ndarray, axis: int) -> int:
    other = tuple(a for a in range(3) if a != axis)
    for labels in (ref, pred):
        counts = np.count_nonzero(labels, axis=other)
        if counts.any():
            return int(np.argmax(counts))
    return ref.shape[axis] // 2


def _plane(volume: np.ndarray, axis: int, index: int, nifti: bool) -> np.ndarray:
    plane = np.take(volume, index, axis=axis)
    return np.rot90(plane) if nifti else plane


def overlay_png(case: CaseRecord, num_classes: int, title: str = "") -> bytes:
    """PNG bytes of one case: image, reference, prediction, and entropy when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    ref_vol = read_label(case.ref)
    pred = read_label(case.pred).array
    ref = ref_vol.array
    if pred.shape != ref.shape:
        raise DataError(case.pred, f"shape {pred.shape} differs from reference {ref.shape}")
    axis = choose_slice_axis(ref_vol.geometry.spacing, ref.shape)
    index = _slice_index(ref, pred, axis)
    nifti = file_ending(case.ref) in NIFTI_ENDINGS
    if case.image is not None:
        image = read_image([case.image]).array
        image = image[0] if image.shape[0] != 3 else image.mean(0)
        if image.shape != ref.shape:
            raise DataError(case.image, f"shape {image.shape} differs from reference {ref.shape}")
    else:
        image = np.zeros(ref.shape, np.float32)
    img = _plane(image, axis, index, nifti)
    lo, hi = np.percentile(img, (1, 99)) if img.size else (0, 1)
    panels = [("image", None), ("reference", ref), ("prediction", pred)]
    if "entropy" in case.maps:
        panels.append(("entropy (nats)", read_map(case.maps["entropy"], "entropy", num_classes)))
    colours = ListedColormap([_COLOURS[i % len(_COLOURS)] for i in range(max(num_classes - 1, 1))])

    h, w = img.shape
    width = 2.6 * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 2.6 * h / w + 0.5), squeeze=False)
    for ax, (name, volume) in zip(axes[0], panels):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        if name.startswith("entropy"):
            plane = _plane(volume, axis, index, nifti)
            top = png_scale("entropy", num_classes)
            shown = ax.imshow(np.ma.masked_less_equal(plane, 1e-4), cmap="magma", vmin=0, vmax=top)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        elif volume is not None:
            plane = _plane(volume, axis, index, nifti).astype(np.int64)
            ax.imshow(
                np.ma.masked_equal(plane, 0),
                cmap=colours,
                vmin=0.5,
                vmax=max(num_classes - 1, 1) + 0.5,
                alpha=0.55,
                interpolation="nearest",
            )
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title or case.case} (slice {index} along axis {axis})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_overlays(
    pred_dir: str | Path,
    eval_dir: str | Path,
    out_dir: str | Path,
    *,
    images: str | Path | None = None,
    force: bool = False,
) -> list[Path]:
    """One overlay PNG per evaluated case, ``out_dir/<case>_overlay.png``.

    Raises:
        OutputExistsError: an overlay exists and ``force`` is False.
        DataError: as :func:`~medflow.report.cases.collect`.
    """
    from medflow.data.io import staged_outputs

    data = collect(pred_dir, eval_dir, images)
    out_dir = Path(out_dir)
    # a name no prediction or reference has, so a wrong --png folder overwrites no mask
    targets = [out_dir / f"{c.case}_overlay.png" for c in data.cases]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise OutputExistsError(existing[0])
    pictures = [overlay_png(c, data.num_classes, _title(c)) for c in data.cases]
    with staged_outputs(out_dir) as stage:
        for target, png in zip(targets, pictures):
            atomic_write(stage / target.name, lambda tmp, png=png: tmp.write_bytes(png))
    return targets


def _title(case: CaseRecord) -> str:
    unc = "" if case.uncertainty is None else f", uncertainty {case.uncertainty:.3f}"
    return f"{case.case}: Dice {case.mean['dice']:.3f}{unc}"
