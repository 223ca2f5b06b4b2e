"""Score predictions against references: one case, or two folders into ``per_case.csv`` and
``summary.json``.

Every foreground class (label value other than 0) gets Dice, IoU, HD95 and ASSD (mm) with the
empty-mask policy of :mod:`medflow.metrics.overlap` and :mod:`medflow.metrics.surface`, so
every value is finite and every case counts in the means. Each row also records
``ref_voxels`` and ``pred_voxels``, so a reader can see which rows the policy decided.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medflow.data.io import read_label, staged_outputs
from medflow.errors import DataError, OutputExistsError
from medflow.metrics.folders import (
    check_labels,
    foreground_classes,
    label_files,
    labels_from_dataset_json,
    labels_from_references,
    pair_cases,
)
from medflow.metrics.lesions import lesion_detection, pool
from medflow.metrics.overlap import confusion, dice, iou
from medflow.metrics.surface import surface_metrics

METRICS = ("dice", "iou", "hd95", "assd")
LESION_RULE = "connected components, full connectivity; found = any overlap"
CSV_COLUMNS = ("case", "class", *METRICS, "ref_voxels", "pred_voxels")
EMPTY_POLICY = (
    "reference and prediction empty: dice=iou=1, hd95=assd=0; exactly one empty (missed or "
    "false structure): dice=iou=0, hd95=assd=image diagonal sqrt(sum(((n_i-1)*s_i)^2)) mm; "
    "every case counts in the means"
)


def evaluate_case(
    pred: np.ndarray, ref: np.ndarray, labels: dict[str, int], spacing: Sequence[float]
) -> dict[str, dict[str, float]]:
    """Score one predicted label map against its reference, per foreground class.

    Args:
        pred: predicted integer label map, 2D ``(H, W)`` or 3D ``(X, Y, Z)``.
        ref: reference integer label map, same shape.
        labels: class name -> label value; value 0 (background) is not scored.
        spacing: voxel size in mm per axis of the maps.

    Returns:
        ``{class name: {"dice", "iou", "hd95", "assd", "ref_voxels", "pred_voxels"}}``; the
        distances are in mm and the voxel counts are ints.

    Raises:
        ValueError: shapes differ, bad labels, or spacing does not fit the maps.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    out: dict[str, dict[str, float]] = {}
    for name, value in foreground_classes(check_labels(labels)):
        tp, fp, fn = confusion(pred, ref, value)
        hd95, assd = surface_metrics(pred == value, ref == value, spacing)
        out[name] = {
            "dice": dice(tp, fp, fn),
            "iou": iou(tp, fp, fn),
            "hd95": hd95,
            "assd": assd,
            "ref_voxels": tp + fn,
            "pred_voxels": tp + fp,
        }
    return out


def _evaluate_pair(
    case: str, pred_path: Path, ref_path: Path, labels: dict[str, int], lesions: bool = False
) -> dict:
    """Read, check and score one case; DataError naming the file at fault."""
    ref = read_label(ref_path)
    pred = read_label(pred_path)
    if pred.array.shape != ref.array.shape:
        shapes = f"shape {pred.array.shape} differs from {ref.array.shape} of reference {ref_path}"
        raise DataError(pred_path, shapes)
    known = set(labels.values()) | {0}
    for path, vol in ((pred_path, pred), (ref_path, ref)):
        unknown = sorted(set(np.unique(vol.array).tolist()) - known)
        if unknown:
            raise DataError(path, f"holds label value(s) {unknown} not in labels {labels}")
    metrics = evaluate_case(pred.array, ref.array, labels, ref.geometry.spacing)
    row = {"case": case, "pred": str(pred_path), "ref": str(ref_path), "metrics": metrics}
    if lesions:
        row["lesions"] = {
            name: lesion_detection(pred.array, ref.array, value, spacing=ref.geometry.spacing)
            for name, value in foreground_classes(labels)
        }
    return row


def _pool_lesions(per_case: list[dict]) -> dict:
    """Lesion-wise detection per class pooled over the cases (micro average,
    :func:`medflow.metrics.lesions.pool`); the per-case results become plain dicts."""
    names = list(per_case[0]["lesions"])
    pooled = {n: pool([c["lesions"][n] for c in per_case]).to_dict() for n in names}
    for c in per_case:
        c["lesions"] = {n: d.to_dict() for n, d in c["lesions"].items()}
    return pooled


def _summarise(per_case: list[dict], labels: dict[str, int]) -> dict:
    names = [name for name, _ in foreground_classes(labels)]

    def stat(reduce) -> dict[str, dict[str, float]]:
        return {
            n: {m: float(reduce([c["metrics"][n][m] for c in per_case])) for m in METRICS}
            for n in names
        }

    mean = stat(np.mean)
    return {
        "n_cases": len(per_case),
        "labels": labels,
        "policy": EMPTY_POLICY,
        "spacing_source": "reference",
        "mean": mean,
        "std": stat(np.std),  # population std (ddof=0) over cases
        "foreground_mean": {m: float(np.mean([mean[n][m] for n in names])) for m in METRICS},
        "per_case": per_case,
    }


def _csv_text(summary: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in summary["per_case"]:
        for name, m in row["metrics"].items():
            writer.writerow([row["case"], name, *(m[k] for k in CSV_COLUMNS[2:])])
    return buf.getvalue()


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    out_dir: str | Path,
    labels: dict[str, int] | None = None,
    force: bool = False,
    lesions: bool = False,
) -> dict:
    """Score every prediction in ``pred_dir`` against its reference in ``ref_dir``.

    With ``lesions``, each class is also scored object by object (lesion-wise detection,
    :mod:`medflow.metrics.lesions`: connected components, a reference lesion found when a
    predicted component overlaps it): per case under ``per_case[i]["lesions"]`` and pooled
    over the cases under ``lesion_detection``.

    Files pair by case id (the file name without its ending, so ``case_001.nii.gz`` pairs with
    ``case_001.nii.gz`` or ``case_001.png``). Uncertainty maps beside a mask
    (``case_001_entropy.nii.gz``, ``case_001_variance.nii.gz``) are skipped. Distances use
    the reference file's spacing.
    Everything is read, checked and scored before anything is written, and both outputs
    appear together (written into a hidden folder in ``out_dir``, then moved into place), so
    a failure leaves neither.

    Args:
        pred_dir: folder of predicted label maps.
        ref_dir: folder of reference label maps.
        out_dir: where ``per_case.csv`` and ``summary.json`` go (created if missing).
        labels: class name -> value. ``None``: the ``labels`` of ``ref_dir.parent/dataset.json``
            (nnU-Net v2 or MSD), else every value found in the references as ``label_<v>``.
        force: overwrite existing results in ``out_dir``.

    Returns:
        The summary written to ``summary.json``: ``n_cases``, ``labels``, ``policy``,
        ``spacing_source``, ``mean`` and ``std`` (``{class: {metric: value}}``),
        ``foreground_mean`` (``{metric: mean of the class means}``) and ``per_case``
        (``[{"case", "pred", "ref", "metrics": {class: {...}}}]``).

    Raises:
        OutputExistsError: ``out_dir`` holds results and ``force`` is False.
        DataError: a folder is missing or empty, a reference has no prediction or a prediction
            no reference, shapes differ, a map holds a value not in ``labels``, or
            ``dataset.json`` is unusable.
        ValueError: ``labels`` is malformed.
    """
    pred_dir, ref_dir, out_dir = Path(pred_dir), Path(ref_dir), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "is a file; expected an output folder")
    outputs = (out_dir / "per_case.csv", out_dir / "summary.json")
    if not force and any(p.exists() for p in outputs):
        raise OutputExistsError(out_dir)

    refs = label_files(ref_dir, "reference")
    preds = label_files(pred_dir, "prediction")
    cases = pair_cases(preds, refs, pred_dir, ref_dir)
    if labels is not None:
        labels = check_labels(labels)
    else:
        labels = labels_from_dataset_json(ref_dir.parent / "dataset.json")
        if labels is None:
            labels = labels_from_references(refs, ref_dir)

    per_case = [_evaluate_pair(c, preds[c], refs[c], labels, lesions) for c in cases]
    pooled = _pool_lesions(per_case) if lesions else None
    summary = _summarise(per_case, labels)
    if pooled is not None:
        summary["lesion_detection"] = {"rule": LESION_RULE, "pooled": pooled}
    texts = (_csv_text(summary), json.dumps(summary, indent=2, allow_nan=False) + "\n")
    with staged_outputs(out_dir) as stage:
        for target, text in zip(outputs, texts):
            try:
                (stage / target.name).write_text(text)
            except OSError as exc:  # disk full, permission denied: the user's to fix, named
                raise DataError(target, f"cannot be written: {exc.strerror or exc}") from exc
    return summary


def format_summary(summary: dict) -> str:
    """A plain-text table of the class means and the foreground mean, for the terminal (and
    the pooled lesion-wise detection when it was scored)."""
    rows = [(name, m) for name, m in summary["mean"].items()]
    rows.append(("foreground mean", summary["foreground_mean"]))
    width = max(len("class"), *(len(name) for name, _ in rows))
    header = f"{'class':<{width}}  {'Dice':>7}  {'IoU':>7}  {'HD95 mm':>9}  {'ASSD mm':>9}"
    lines = [f"{summary['n_cases']} cases", header, "-" * len(header)]
    for name, m in rows:
        lines.append(
            f"{name:<{width}}  {m['dice']:>7.4f}  {m['iou']:>7.4f}  "
            f"{m['hd95']:>9.2f}  {m['assd']:>9.2f}"
        )
    if "lesion_detection" in summary:
        lines += ["", f"lesion-wise ({summary['lesion_detection']['rule']}), pooled over cases:"]
        for name, d in summary["lesion_detection"]["pooled"].items():
            lines.append(
                f"{name:<{width}}  F1 {d['f1']:.3f}  precision {d['precision']:.3f}  "
                f"recall {d['recall']:.3f}  (found {d['tp']}, missed {d['fn']}, false {d['fp']})"
            )
    return "\n".join(lines)
