"""Score posterior samples against several raters per case: ``ambiguity_per_case.csv`` and
``ambiguity.json``.

A dataset with several annotations per case (nnU-Net raw v2, extended) holds, for split
``Ts``:

* ``labelsTs/<case><ending>``: rater 0;
* ``ratersTs/<case>_rater01<ending>`` ... ``_rater{R-1:02d}``: the other raters;
* ``probabilitiesTs/<case><ending>`` (optional): the true class probabilities, float32
  ``(X, Y, Z, K)``, channel ``k`` = P(label ``k``).

A prediction folder written by ``medflow predict --save-samples`` holds, per case, the fused
mask ``<case><ending>``, the samples ``<case>_sample00<ending>``, ``_sample01``, ... and
optionally the fused soft mask ``<case>_probabilities<ending>`` (``(X, Y, Z, K)``).

Per case and sample count ``S``: GED, its terms, the diversity of the samples and the
Hungarian-matched IoU on the first ``S`` samples (:mod:`medflow.metrics.ambiguity`); per case:
the Dice of the fused mask against each rater, averaged over raters, and, where both soft
masks exist, soft ECE, Brier and MAE inside the region that is not certain background.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medflow.data.io import file_ending, read_image, read_label, staged_outputs
from medflow.data.layout import rater_annotations
from medflow.data.naming import PROBABILITIES, sample_name, split_map_name
from medflow.errors import DataError, OptionError, OutputExistsError
from medflow.metrics import ambiguity as amb
from medflow.metrics.folders import (
    foreground_classes,
    label_files,
    labels_from_dataset_json,
    labels_from_references,
    pair_cases,
)
from medflow.metrics.overlap import confusion, dice

OUTPUTS = ("ambiguity_per_case.csv", "ambiguity.json")
GED_KEYS = ("ged2", "cross", "sample_diversity", "ref_diversity", "diversity", "matched_iou")
CALIBRATION_KEYS = ("ece", "brier", "mae")
CSV_COLUMNS = ("case", "samples", *GED_KEYS, "dice", *CALIBRATION_KEYS, "region_voxels")
POLICY = (
    "d = 1 - IoU averaged over foreground classes, a class empty in both maps has IoU 1; GED "
    "over all pairs (i = j included); diversity over i != j; calibration inside target[0] < 1, "
    "0 where that region is empty; every case counts in every mean"
)
# a fused soft mask's classes must sum to 1; float32 averages of softmaxes stay far closer
_SUM_TOL = 1e-3


def _files_by_name(folder: Path) -> dict[str, Path]:
    """File name without its ending -> file, for the supported files in ``folder``."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue  # hidden: atomic_write's temporary files, .DS_Store
        try:
            found[path.name[: -len(file_ending(path))]] = path
        except DataError:
            continue  # notes, previews, ...
    return found


def _numbered(
    indexed: dict[int, Path],
    first: int,
    folder: Path,
    name: Callable[[int], str],
    case: str,
    what: str,
) -> list[Path]:
    """``indexed`` as a list from index ``first``; DataError naming the first gap."""
    count = first + len(indexed)
    for i in range(first, count):
        if i not in indexed:
            later = indexed[max(indexed)].name
            raise DataError(
                folder / name(i),
                f"not found, but {later} exists; {what} of {case!r} are "
                f"numbered from {first:02d} without gaps",
            )
    return [indexed[i] for i in range(first, count)]


def _same_count(
    found: dict[str, list[Path]],
    folder: Path,
    name: Callable[[str, int], str],
    what: str,
    first: int,
) -> int:
    """The common length of ``found``'s lists, numbered from ``first``; DataError naming the
    first missing file of a shorter list otherwise."""
    most = max(found, key=lambda c: len(found[c]))
    for case, files in found.items():
        if len(files) < len(found[most]):
            raise DataError(
                folder / name(case, first + len(files)),
                f"not found: {most!r} has {len(found[most])} {what}, {case!r} {len(files)}; "
                f"every case needs the same number",
            )
    return len(found[most])


def rater_files(dataset_root: str | Path, split: str = "Ts") -> dict[str, tuple[Path, ...]]:
    """Every case's annotations, rater 0 (``labels<split>/<case>``) first, then
    ``raters<split>/<case>_rater01`` ... in order (read by the layout's one reader,
    :func:`medflow.data.layout.rater_annotations`).

    Raises:
        DataError: ``labels<split>`` is missing or empty, ``raters<split>`` is missing or
            empty, or the rater files break the layout (misnamed, numbered 00, a gap, a case
            with other raters than the rest, a rater without a label).
    """
    root = Path(dataset_root)
    labels = label_files(root / f"labels{split}", "reference")
    folder = root / f"raters{split}"
    if not folder.is_dir():
        raise DataError(folder, "folder not found; expected <case>_rater01<ending> files there")
    ending = file_ending(next(iter(labels.values())))
    found = rater_annotations(dict(sorted(labels.items())), folder, root / f"labels{split}", ending)
    if not found:
        raise DataError(folder, f"holds no rater files; expected <case>_rater01{ending}")
    return found


def _prediction_extras(pred_dir: Path, masks: dict[str, Path]) -> tuple[dict, dict]:
    """``({case: [sample paths]}, {case: probabilities path})`` beside the fused masks."""
    indexed: dict[str, dict[int, Path]] = {case: {} for case in masks}
    probabilities: dict[str, Path] = {}
    for stem, path in _files_by_name(pred_dir).items():
        split = split_map_name(stem)
        if split is None or split[0] not in masks:
            continue
        case, kind = split
        if kind == PROBABILITIES:
            probabilities[case] = path
        elif kind.startswith("sample"):
            indexed[case][int(kind[len("sample") :])] = path

    def name(case: str, i: int) -> str:
        return sample_name(case, i, file_ending(masks[case]))

    samples = {}
    for case, ix in indexed.items():
        if not ix:
            raise DataError(
                pred_dir / name(case, 0),
                f"not found: no posterior samples of case {case!r}; predict with --save-samples",
            )
        samples[case] = _numbered(ix, 0, pred_dir, lambda i, c=case: name(c, i), case, "samples")
    return samples, probabilities


def _check_samples(samples: Sequence[int]) -> list[int]:
    values = list(dict.fromkeys(samples))  # unique, in the order given
    if not values or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in values):
        raise OptionError(f"--samples {list(samples)}: give sample counts of at least 1")
    return values


def _read_map(path: Path, shape: tuple | None, known: set[int], first: Path | None) -> np.ndarray:
    """Read a label map; DataError if its shape differs from ``first``'s or a value is unknown."""
    vol = read_label(path)
    if shape is not None and vol.array.shape != shape:
        raise DataError(path, f"shape {vol.array.shape} differs from {shape} of {first}")
    unknown = sorted(set(np.unique(vol.array).tolist()) - known)
    if unknown:
        raise DataError(path, f"holds label value(s) {unknown} not in the labels {sorted(known)}")
    return vol.array


def _read_soft(path: Path, shape: tuple[int, ...], ref: Path) -> np.ndarray:
    """Read a soft mask as ``(K, X, Y, Z)``; DataError unless it is ``shape`` and sums to 1."""
    probs = read_image([path]).array
    if probs.shape != shape:
        raise DataError(
            path,
            f"probability map of shape {(*probs.shape[1:], probs.shape[0])} does not fit "
            f"{ref} (expected {(*shape[1:], shape[0])}: the reference's shape and one channel "
            f"per label value)",
        )
    total = probs.sum(0, dtype=np.float64)
    if probs.min() < -_SUM_TOL or probs.max() > 1 + _SUM_TOL or np.abs(total - 1).max() > _SUM_TOL:
        raise DataError(path, "is no probability map: values must lie in [0, 1] and sum to 1")
    return probs


def _fused_dice(fused: np.ndarray, refs: list[np.ndarray], labels: dict[str, int]) -> dict:
    """``{class: mean Dice of the fused mask against each rater}``."""
    return {
        name: float(np.mean([dice(*confusion(fused, ref, value)) for ref in refs]))
        for name, value in foreground_classes(labels)
    }


def _ged_rows(
    samples: list[np.ndarray], refs: list[np.ndarray], classes: list[int], counts: list[int]
) -> dict[str, dict[str, float]]:
    """``{str(S): {GED_KEYS}}`` on the first ``S`` samples, from one set of distances."""
    n = max(counts)
    d_sy, d_ss, d_yy = amb.pairwise_distances(samples[:n], refs, classes)
    rows = {}
    for s in counts:
        g = amb.ged_from_distances(d_sy[:s], d_ss[:s, :s], d_yy)
        rows[str(s)] = {
            "ged2": g.ged2,
            "cross": g.cross,
            "sample_diversity": g.sample_diversity,
            "ref_diversity": g.ref_diversity,
            "diversity": amb.diversity_from_distances(d_ss[:s, :s]),
            "matched_iou": amb.matched_iou_from_distances(d_sy[:s]),
        }
    return rows


def _calibration(pred: Path, true: Path, shape: tuple[int, ...], ref: Path) -> dict:
    probs, target = _read_soft(pred, shape, ref), _read_soft(true, shape, ref)
    region = amb.soft_region(target)
    return {
        "ece": amb.soft_ece(probs, target, region),
        "brier": amb.brier(probs, target, region),
        "mae": amb.prob_mae(probs, target, region),
        "region_voxels": int(np.count_nonzero(region)),
    }


def _score_case(case: str, files: dict, labels: dict[str, int], counts: list[int]) -> dict:
    """Read, check and score one case; DataError naming the file at fault."""
    known = set(labels.values()) | {0}
    first = files["refs"][0]
    ref0 = _read_map(first, None, known, None)
    refs = [ref0] + [_read_map(p, ref0.shape, known, first) for p in files["refs"][1:]]
    fused = _read_map(files["fused"], ref0.shape, known, first)
    samples = [_read_map(p, ref0.shape, known, first) for p in files["samples"][: max(counts)]]
    classes = [value for _, value in foreground_classes(labels)]
    calibration = None
    if files["probabilities"] is not None and files["true_probabilities"] is not None:
        shape = (max(labels.values()) + 1, *ref0.shape)
        calibration = _calibration(
            files["probabilities"], files["true_probabilities"], shape, first
        )
    per_class = _fused_dice(fused, refs, labels)
    return {
        "case": case,
        "fused": str(files["fused"]),
        "refs": [str(p) for p in files["refs"]],
        "probabilities": None if files["probabilities"] is None else str(files["probabilities"]),
        "true_probabilities": (
            None if files["true_probabilities"] is None else str(files["true_probabilities"])
        ),
        "dice": per_class,
        "dice_mean": float(np.mean(list(per_class.values()))),
        "ged": _ged_rows(samples, refs, classes, counts),
        "calibration": calibration,
    }


def _mean(per_case: list[dict], counts: list[int]) -> dict:
    calibrated = [c["calibration"] for c in per_case if c["calibration"] is not None]
    classes = list(per_case[0]["dice"])
    return {
        "dice": {n: float(np.mean([c["dice"][n] for c in per_case])) for n in classes},
        "dice_mean": float(np.mean([c["dice_mean"] for c in per_case])),
        "ged": {
            str(s): {k: float(np.mean([c["ged"][str(s)][k] for c in per_case])) for k in GED_KEYS}
            for s in counts
        },
        "calibration": (
            {k: float(np.mean([c[k] for c in calibrated])) for k in CALIBRATION_KEYS}
            if calibrated
            else None
        ),
        "calibrated_cases": len(calibrated),
    }


def ambiguity_results(
    pred_dir: str | Path,
    dataset_root: str | Path,
    *,
    split: str = "Ts",
    samples: Sequence[int] = (1, 4, 16),
) -> dict:
    """Read and score every case of ``dataset_root``'s split; writes nothing.

    The same as :func:`evaluate_ambiguity` without the files (the CLI checks everything
    before ``evaluate`` writes its first output).

    Raises:
        DataError: a folder or file is missing or unusable (see :func:`evaluate_ambiguity`).
        OptionError: a sample count below 1.
    """
    pred_dir, root = Path(pred_dir), Path(dataset_root)
    wanted = _check_samples(samples)
    refs = rater_files(root, split)
    labels_dir = root / f"labels{split}"
    labels = labels_from_dataset_json(root / "dataset.json")
    if labels is None:
        labels = labels_from_references({c: r[0] for c, r in refs.items()}, labels_dir)
    masks = label_files(pred_dir, "prediction")
    cases = pair_cases(masks, {c: r[0] for c, r in refs.items()}, pred_dir, labels_dir)
    sample_files, probabilities = _prediction_extras(pred_dir, masks)
    found = _same_count(
        sample_files,
        pred_dir,
        lambda c, i: sample_name(c, i, file_ending(masks[c])),
        "samples",
        0,
    )
    counts = [s for s in wanted if s <= found]
    if not counts:
        raise DataError(
            pred_dir, f"holds {found} sample(s) per case, fewer than any of --samples {wanted}"
        )
    truth = _files_by_name(root / f"probabilities{split}")
    per_case = []
    for case in cases:
        files = {
            "refs": refs[case],
            "fused": masks[case],
            "samples": sample_files[case],
            "probabilities": probabilities.get(case),
            "true_probabilities": truth.get(case),
        }
        per_case.append(_score_case(case, files, labels, counts))
    return {
        "n_cases": len(per_case),
        "labels": labels,
        "raters": len(next(iter(refs.values()))),
        "samples": counts,
        "samples_found": found,
        "policy": POLICY,
        "mean": _mean(per_case, counts),
        "per_case": per_case,
    }


def _csv_text(results: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in results["per_case"]:
        cal = row["calibration"] or {}
        for s, g in row["ged"].items():
            writer.writerow(
                [
                    row["case"],
                    s,
                    *(g[k] for k in GED_KEYS),
                    row["dice_mean"],
                    *(cal.get(k, "") for k in (*CALIBRATION_KEYS, "region_voxels")),
                ]
            )
    return buf.getvalue()


def check_outputs(out_dir: str | Path, force: bool = False) -> None:
    """Refuse an ``out_dir`` that already holds ambiguity results, unless ``force``.

    Raises:
        OutputExistsError: ``ambiguity_per_case.csv`` or ``ambiguity.json`` exists.
        DataError: ``out_dir`` is a file.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "is a file; expected an output folder")
    if not force and any((out_dir / name).exists() for name in OUTPUTS):
        raise OutputExistsError(out_dir)


def write_ambiguity(results: dict, out_dir: str | Path, *, force: bool = False) -> None:
    """Write ``results`` as ``ambiguity_per_case.csv`` and ``ambiguity.json``, both or neither.

    Raises:
        OutputExistsError: results exist and ``force`` is False.
        DataError: a file cannot be written.
    """
    out_dir = Path(out_dir)
    check_outputs(out_dir, force)
    texts = (_csv_text(results), json.dumps(results, indent=2, allow_nan=False) + "\n")
    with staged_outputs(out_dir) as stage:
        for name, text in zip(OUTPUTS, texts):
            try:
                (stage / name).write_text(text)
            except OSError as exc:  # disk full, permission denied: the user's to fix, named
                raise DataError(
                    out_dir / name, f"cannot be written: {exc.strerror or exc}"
                ) from exc


def evaluate_ambiguity(
    pred_dir: str | Path,
    dataset_root: str | Path,
    out_dir: str | Path,
    *,
    split: str = "Ts",
    samples: Sequence[int] = (1, 4, 16),
    force: bool = False,
) -> dict:
    """Score the posterior samples in ``pred_dir`` against every rater of each case.

    Every case of ``dataset_root/labels<split>`` needs its fused mask and samples
    ``_sample00``, ``_sample01``, ... in ``pred_dir`` (the same number for every case).
    Each ``S`` in ``samples`` up to that number is scored on the first ``S`` samples; larger
    ones are left out (``results["samples"]`` lists those scored). Calibration is scored for
    the cases with both ``<case>_probabilities`` and ``probabilities<split>/<case>``. Labels
    come from ``dataset_root/dataset.json``, else from the values in ``labels<split>``.
    Everything is read and scored before the two files are written, together.

    Args:
        pred_dir: the prediction folder of ``medflow predict --save-samples``.
        dataset_root: the dataset folder holding ``labels<split>``, ``raters<split>`` and,
            optionally, ``probabilities<split>``.
        out_dir: where ``ambiguity_per_case.csv`` and ``ambiguity.json`` go.
        split: ``"Ts"`` (the test cases) or another folder suffix such as ``"Tr"``.
        samples: the sample counts ``S`` to score.
        force: overwrite existing results.

    Returns:
        The content of ``ambiguity.json``: ``n_cases``, ``labels``, ``raters`` (R),
        ``samples`` (the ``S`` scored), ``samples_found``, ``policy``, ``mean`` and
        ``per_case`` (docs/METRICS.md lists the keys).

    Raises:
        OutputExistsError: results exist in ``out_dir`` and ``force`` is False.
        DataError: naming the file: a folder is missing, a case lacks its prediction, samples
            or a rater file, a map has another shape than the case's rater 0 or a value not in
            the labels, a probability map has the wrong shape or does not sum to 1.
        OptionError: a sample count below 1.
    """
    check_outputs(out_dir, force)
    results = ambiguity_results(pred_dir, dataset_root, split=split, samples=samples)
    write_ambiguity(results, out_dir, force=force)
    return results


def format_ambiguity(results: dict) -> str:
    """A plain-text table of the means per sample count, and calibration, for the terminal."""
    mean = results["mean"]
    header = f"{'S':>3}  {'GED^2':>7}  {'diversity':>9}  {'matched IoU':>11}"
    lines = [
        f"{results['n_cases']} cases, {results['raters']} raters, "
        f"fused Dice vs raters {mean['dice_mean']:.4f}",
        header,
        "-" * len(header),
    ]
    for s, g in mean["ged"].items():
        lines.append(
            f"{s:>3}  {g['ged2']:>7.4f}  {g['diversity']:>9.4f}  {g['matched_iou']:>11.4f}"
        )
    cal = mean["calibration"]
    if cal is None:
        lines.append("calibration: no case has both probability maps")
    else:
        lines.append(
            f"calibration ({mean['calibrated_cases']} of {results['n_cases']} cases): "
            f"ECE {cal['ece']:.4f}  "
            f"Brier {cal['brier']:.4f}  MAE {cal['mae']:.4f}"
        )
    return "\n".join(lines)
