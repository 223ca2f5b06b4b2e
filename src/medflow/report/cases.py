"""What a report shows about each case, gathered from a prediction and an evaluation folder.

``summary.json`` (written by ``medflow evaluate``) lists the cases with their metrics and the
prediction and reference files; the image of each case is looked up beside the references
(``labelsTs`` -> ``imagesTs``, first channel ``<case>_0000``) unless a folder is given, and
the uncertainty maps beside the masks (``<case>_entropy``, ``<case>_variance``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medflow.data.io import PNG_ENDINGS, SUPPORTED_ENDINGS, file_ending, read_image, read_label
from medflow.data.naming import MAPS, map_name
from medflow.errors import DataError
from medflow.metrics.summary import METRICS
from medflow.uncertainty.maps import case_uncertainty, png_scale


@dataclass(frozen=True)
class CaseRecord:
    """One evaluated case and its files.

    Attributes:
        case: the case id.
        metrics: ``{class: {"dice", "iou", "hd95", "assd", ...}}`` from ``summary.json``.
        mean: foreground mean of each metric over the classes of this case.
        pred: predicted label map file.
        ref: reference label map file.
        image: first image channel, or ``None`` where none was found.
        maps: ``{"entropy": path, "variance": path}`` for the maps found beside ``pred``.
        uncertainty: :func:`~medflow.uncertainty.maps.case_uncertainty` from the entropy
            map, or ``None`` without one.
    """

    case: str
    metrics: dict[str, dict[str, float]]
    mean: dict[str, float]
    pred: Path
    ref: Path
    image: Path | None
    maps: dict[str, Path] = field(default_factory=dict)
    uncertainty: float | None = None


@dataclass(frozen=True)
class ReportData:
    """Everything a report draws from: cases in ``summary.json`` order and the run's record.

    Attributes:
        summary: ``summary.json`` as read.
        cases: one record per case.
        prediction: ``prediction.json`` written by ``predict --uncertainty``, or ``{}``.
        num_classes: classes of the model, background included (scales PNG maps).
    """

    summary: dict
    cases: list[CaseRecord]
    prediction: dict
    num_classes: int


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DataError(path, f"not found; {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot be read as JSON: {str(exc)[:200]}") from exc
    if not isinstance(data, dict):
        raise DataError(path, "does not hold a JSON object")
    return data


def read_map(path: Path, kind: str, num_classes: int) -> np.ndarray:
    """An uncertainty map ``(X, Y, Z)`` float32 in its own units (PNG maps rescaled)."""
    values = read_image([path]).array[0]
    if file_ending(path) in PNG_ENDINGS:
        values = values / 65535.0 * png_scale(kind, num_classes)
    return values.astype(np.float32)


def _image_of(case: str, folder: Path) -> Path | None:
    for ending in SUPPORTED_ENDINGS:
        for name in (f"{case}_0000{ending}", f"{case}{ending}"):
            if (folder / name).is_file():
                return folder / name
    return None


def _images_beside(ref_dir: Path) -> Path:
    """nnU-Net's sibling image folder of a reference folder (``labelsTs`` -> ``imagesTs``)."""
    name = ref_dir.name
    return ref_dir.parent / (name.replace("labels", "images", 1) if "labels" in name else name)


def collect(
    pred_dir: str | Path, eval_dir: str | Path, images: str | Path | None = None
) -> ReportData:
    """Read ``summary.json``, find each case's image and maps, and score its uncertainty.

    Raises:
        DataError: no ``summary.json``, a prediction or reference it names is missing, or an
            image folder was given and lacks a case.
    """
    pred_dir, eval_dir = Path(pred_dir), Path(eval_dir)
    if not pred_dir.is_dir():
        raise DataError(pred_dir, "prediction folder not found")
    summary = _read_json(eval_dir / "summary.json", "run medflow evaluate first")
    record_path = pred_dir / "prediction.json"
    prediction = _read_json(record_path, "") if record_path.is_file() else {}
    labels = prediction.get("labels") or summary.get("labels") or {}
    num_classes = max(2, len(labels))
    cases = []
    for row in summary.get("per_case", []):
        case = str(row["case"])
        ref = Path(row["ref"])
        # the masks live in pred_dir, whatever folder name evaluate was given
        pred = pred_dir / Path(row["pred"]).name
        for path, role in ((pred, "prediction"), (ref, "reference")):
            if not path.is_file():
                raise DataError(path, f"{role} of case {case!r} in summary.json not found")
        folder = Path(images) if images is not None else _images_beside(ref.parent)
        image = _image_of(case, folder)
        if image is None and images is not None:
            raise DataError(folder, f"holds no image for case {case!r} ({case}_0000 or {case})")
        ending = file_ending(pred)
        maps = {k: pred_dir / map_name(case, k, ending) for k in MAPS}
        maps = {k: p for k, p in maps.items() if p.is_file()}
        uncertainty = None
        if "entropy" in maps:
            entropy = read_map(maps["entropy"], "entropy", num_classes)
            uncertainty = case_uncertainty(entropy, read_label(pred).array)
        metrics = row["metrics"]
        mean = {m: float(np.mean([metrics[c][m] for c in metrics])) for m in METRICS}
        cases.append(CaseRecord(case, metrics, mean, pred, ref, image, maps, uncertainty))
    if not cases:
        raise DataError(eval_dir / "summary.json", "lists no cases")
    return ReportData(summary, cases, prediction, num_classes)


def best_median_worst(cases: list[CaseRecord]) -> list[tuple[str, CaseRecord]]:
    """The cases with the highest, the median and the lowest foreground-mean Dice (each once;
    ties go to the earlier case in ``summary.json``)."""
    ranked = sorted(cases, key=lambda c: -c.mean["dice"])
    picks = [("best", ranked[0]), ("median", ranked[len(ranked) // 2]), ("worst", ranked[-1])]
    seen, out = set(), []
    for role, case in picks:
        if case.case not in seen:
            seen.add(case.case)
            out.append((role, case))
    return out
