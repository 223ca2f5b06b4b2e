"""Prediction and reference folders: which files are label maps, which case pairs with which,
and the class labels to score (from ``dataset.json`` or from the references themselves).

Shared by :mod:`medflow.metrics.summary` (``medflow evaluate``) and
:mod:`medflow.metrics.ambiguity_summary` (``medflow evaluate --raters``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medflow.data.io import SUPPORTED_ENDINGS, file_ending, read_label
from medflow.data.layout import check_unicode
from medflow.data.naming import split_map_name
from medflow.errors import DataError, brief


def check_labels(labels: Mapping[str, int]) -> dict[str, int]:
    """Return ``labels`` as a plain dict after checking names and values; ValueError if bad."""
    if not isinstance(labels, Mapping):
        raise ValueError(f"labels must map class names to integer values, got {labels!r}")
    for name, value in labels.items():
        # bool is an int subclass, and JSON true/false is never meant as a label value
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"label {name!r}: {value!r} is not a name -> integer value pair")
        if value < 0:
            raise ValueError(f"label {name!r} has negative value {value}")
    values = list(labels.values())
    if len(set(values)) != len(values):
        raise ValueError(f"labels {dict(labels)} give the same value to two classes")
    if not any(v != 0 for v in values):
        raise ValueError(f"labels {dict(labels)} name no foreground class (value other than 0)")
    return dict(labels)


def foreground_classes(labels: Mapping[str, int]) -> list[tuple[str, int]]:
    """Foreground ``(name, value)`` pairs in value order, so rows and tables have one order."""
    return sorted(((n, v) for n, v in labels.items() if v != 0), key=lambda nv: nv[1])


def label_files(folder: Path, role: str) -> dict[str, Path]:
    """Case id -> label file for every supported file in ``folder`` (hidden files skipped)."""
    if not folder.is_dir():
        raise DataError(folder, f"{role} folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # hidden names include atomic_write's temporary files from an interrupted run
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            ending = file_ending(path)
        except DataError:
            continue  # dataset.json, notes, ... live beside label maps
        case = path.name[: -len(ending)]
        if case in files:
            raise DataError(path, f"case {case!r} is also {files[case].name}; keep one file")
        files[case] = path
    # uncertainty maps that `predict --uncertainty` writes beside a case's mask are no masks
    for case in [c for c in files if (m := split_map_name(c)) and m[0] in files]:
        del files[case]
    if not files:
        endings = ", ".join(SUPPORTED_ENDINGS)
        raise DataError(folder, f"{role} folder holds no label files ({endings})")
    return files


def pair_cases(
    preds: dict[str, Path], refs: dict[str, Path], pred_dir: Path, ref_dir: Path
) -> list[str]:
    """Case ids present in both folders; DataError naming the first file without a partner."""
    missing = sorted(set(refs) - set(preds))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        first = refs[missing[0]]
        raise DataError(pred_dir / first.name, f"not found: no prediction for {first}{more}")
    extra = sorted(set(preds) - set(refs))
    if extra:
        # a prediction nobody scores usually means the wrong folder was given
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise DataError(preds[extra[0]], f"has no reference in {ref_dir}{more}")
    return sorted(refs)


def labels_from_dataset_json(path: Path) -> dict[str, int] | None:
    """Labels of an nnU-Net v2 (``{name: value}``) or MSD (``{"1": name}``) ``dataset.json``."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise DataError(path, f"cannot be read as JSON: {str(exc)[:200]}") from exc
    except RecursionError:
        raise DataError(path, "cannot be read as JSON: nested too deeply") from None
    check_unicode(raw, path)
    labels = raw.get("labels") if isinstance(raw, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise DataError(path, 'has no "labels" mapping; add one or pass labels explicitly')
    # MSD writes value -> name; ASCII digits only ("²".isdigit() is true but int() refuses it)
    if all(isinstance(v, str) for v in labels.values()) and all(
        k.isascii() and k.isdigit() and len(k) < 10 for k in labels
    ):
        labels = {name: int(value) for value, name in labels.items()}
    for name, value in labels.items():
        if isinstance(value, list):
            raise DataError(
                path,
                f"label {brief(name)} is a region {brief(value)}; regions are not supported, "
                "pass labels",
            )
    try:
        return check_labels(labels)
    except ValueError as exc:
        raise DataError(path, str(exc)[:300]) from exc


def labels_from_references(refs: dict[str, Path], ref_dir: Path) -> dict[str, int]:
    """``{"background": 0, "label_1": 1, ...}`` from the values found in the references."""
    values: set[int] = set()
    for path in refs.values():
        values.update(int(v) for v in np.unique(read_label(path).array))
    values.discard(0)
    if not values:
        raise DataError(ref_dir, "references hold only background (0); pass labels explicitly")
    return {"background": 0, **{f"label_{v}": v for v in sorted(values)}}
