"""Dataset folders as typed specs: nnU-Net raw v2 and the Medical Segmentation Decathlon (MSD).

Two layouts are read from ``root/dataset.json``:

* **nnU-Net raw v2** (``channel_names``, ``labels`` name -> value, ``file_ending``,
  ``numTraining``): one file per channel, ``imagesTr/{case}_{XXXX}{ending}``, with
  ``labelsTr/{case}{ending}``; optional ``imagesTs/`` and ``labelsTs/``. Cases come from the
  files on disk. medflow's extension for several annotations per case: optional
  ``ratersTr/`` (``ratersTs/``) holding ``{case}_rater01{ending}``, ``{case}_rater02{ending}``,
  ... for every labelled case, the label map being rater 0 (so nnU-Net tools still read the
  dataset, with one annotation).
* **MSD** (``modality``, ``labels`` value -> name, ``training``, ``test``): one file per case
  holding every modality (a 4D NIfTI); cases come from the lists in ``dataset.json``.

:func:`load_dataset` checks structure only (names, pairing, channel files) and never opens an
image, so it is cheap enough to call on every run. :func:`verify_dataset` opens every file, in
the spirit of nnU-Net's ``--verify_dataset_integrity``, and returns every problem it finds.
:func:`find_cases` groups the inputs of a prediction run into cases.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medflow.data import io
from medflow.errors import DataError, MedflowError, brief

NNUNET = "nnunet"
MSD = "msd"
_LAYOUT_NAMES = {NNUNET: "nnU-Net raw v2", MSD: "Medical Segmentation Decathlon"}

# nnU-Net's channel suffix: exactly four digits after the last underscore.
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>[0-9]{4})$")
# an extra annotation in ratersTr/ratersTs: "_rater" and two or more digits, from 01
_RATER = re.compile(r"^(?P<case>.+)_rater(?P<index>[0-9]{2,})$")
# an index or label value written as a JSON key: ASCII digits, short enough to be an int
_INDEX = re.compile(r"[0-9]{1,9}")

# Image/label grid agreement for NIfTI: spacing in mm, origin in mm, direction cosines.
_SPACING_TOL = 1e-3
_ORIGIN_TOL = 1e-2
_DIRECTION_TOL = 1e-2


@dataclass(frozen=True)
class Case:
    """One case of a dataset or of a prediction input folder.

    Attributes:
        case_id: the case's name, shared by its image and label files.
        images: the channel files in channel order (one file for MSD, which holds every
            modality in a 4D NIfTI).
        label: the label map, or ``None`` where the case has none (prediction inputs, or
            ``imagesTs`` without ``labelsTs``).
        raters: every annotation of the case, rater 0 (``label``) first, then
            ``ratersTr/{case}_rater01{ending}``, ...; empty where the dataset has no raters
            folder for the case's split.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    raters: tuple[Path, ...] = ()


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset folder, parsed and paired but not yet read.

    Attributes:
        root: the dataset folder (holding ``dataset.json``).
        name: ``dataset.json``'s ``name``, or the folder's name.
        layout: ``"nnunet"`` or ``"msd"``.
        channel_names: modality names in channel index order, e.g. ``("FLAIR", "T1w")``.
        labels: class name -> integer value, background 0 first, sorted by value; the values
            are exactly ``0..K-1``.
        file_ending: the ending of every image and label file, e.g. ``".nii.gz"``.
        training: the labelled training cases, sorted by case id.
        test: the ``imagesTs`` cases, sorted by case id, labelled where ``labelsTs`` exists.
    """

    root: Path
    name: str
    layout: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    file_ending: str
    training: tuple[Case, ...]
    test: tuple[Case, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.labels)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names ordered by label value (index ``i`` is value ``i``)."""
        return tuple(sorted(self.labels, key=self.labels.__getitem__))


# ----------------------------------------------------------------------------- load_dataset


def load_dataset(root: str | Path) -> DatasetSpec:
    """Parse ``root/dataset.json`` and pair the dataset's files into cases.

    The layout (nnU-Net raw v2 or MSD) is detected from the keys of ``dataset.json``. No image
    is opened; use :func:`verify_dataset` to check the files' contents.

    Args:
        root: the dataset folder.

    Returns:
        The dataset's spec, cases sorted by case id.

    Raises:
        DataError: naming the file at fault: the folder or ``dataset.json`` is missing or
            malformed, uses something unsupported (region-based or ``ignore`` labels, label
            values other than ``0..K-1``, an unknown file ending), an image has no label or a
            label no image, a channel file is missing, there are no training cases, or a
            raters folder holds a misnamed file, a rater of an unlabelled case, or not the
            same raters for every case.
    """
    root = Path(root).expanduser()
    json_path, meta = _read_json(root)
    layout = _detect_layout(meta, json_path)
    name = meta.get("name", root.name)
    if not isinstance(name, str):
        raise DataError(json_path, f"'name' must be a string, not {_json_type(name)}")
    if layout == NNUNET:
        return _load_nnunet(root, name, meta, json_path)
    return _load_msd(root, name, meta, json_path)


def _read_json(root: Path) -> tuple[Path, dict[str, Any]]:
    if not root.exists():
        raise DataError(root, "dataset folder not found")
    if not root.is_dir():
        raise DataError(root, "is not a folder; expected a dataset folder holding dataset.json")
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(path, "not found; a dataset folder needs a dataset.json (nnU-Net or MSD)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(path, "is not UTF-8 text; expected JSON") from None
    except OSError as exc:
        raise DataError(path, f"cannot be read: {exc.strerror or exc}") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise DataError(path, f"is not valid JSON: {exc.msg} at {where}") from None
    except ValueError as exc:  # a number too long for Python to convert
        raise DataError(path, f"is not usable JSON: {exc}") from None
    except RecursionError:
        raise DataError(path, "is not usable JSON: nested too deeply") from None
    check_unicode(meta, path)
    if not isinstance(meta, dict):
        raise DataError(path, f"must hold a JSON object, not {_json_type(meta)}")
    return path, meta


def check_unicode(value: object, path: Path) -> None:
    """Refuse parsed JSON holding a lone surrogate: ``"\\ud800"`` is valid JSON but decodes
    to no character, and a class name holding one would crash the CSV, log or terminal that
    it reaches much later.

    Raises:
        DataError: naming ``path``.
    """
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            path,
            "holds a \\ud800-\\udfff escape, which is no character (a lone UTF-16 "
            "surrogate); names must be valid Unicode text",
        ) from None
    except RecursionError:
        raise DataError(path, "is not usable JSON: nested too deeply") from None


def _detect_layout(meta: dict[str, Any], json_path: Path) -> str:
    # nnU-Net v2 itself still accepts the v1 key "modality" beside file_ending, so the
    # v2-only keys decide; MSD (and nnU-Net v1, which copied it) has neither.
    if "file_ending" in meta or "channel_names" in meta:
        return NNUNET
    if "training" in meta or "modality" in meta:
        return MSD
    raise DataError(
        json_path,
        "matches no supported layout: expected keys 'channel_names', 'labels', 'file_ending',"
        " 'numTraining' (nnU-Net raw v2) or 'modality', 'labels', 'training' (Medical"
        " Segmentation Decathlon)",
    )


def _require(meta: dict[str, Any], key: str, layout: str, json_path: Path) -> Any:
    if key not in meta:
        raise DataError(
            json_path, f"missing key '{key}', required by the {_LAYOUT_NAMES[layout]} layout"
        )
    return meta[key]


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _parse_channels(value: object, key: str, json_path: Path) -> tuple[str, ...]:
    if not isinstance(value, dict) or not value:
        raise DataError(
            json_path,
            f"'{key}' must be a non-empty object mapping channel index to name, "
            f'e.g. {{"0": "T1"}}; found {_json_type(value)}',
        )
    channels: dict[int, str] = {}
    for index, name in value.items():
        if not _INDEX.fullmatch(index) or not isinstance(name, str):
            raise DataError(
                json_path,
                f"'{key}' entry {brief(index)}: {brief(name)} must map an index string to a "
                "name string",
            )
        channels[int(index)] = name
    # compare against len(value): "0" and "00" collapse to one index
    if sorted(channels) != list(range(len(value))):
        raise DataError(
            json_path,
            f"'{key}' indices must be exactly 0..{len(value) - 1}; found {brief(list(value))}",
        )
    return tuple(channels[i] for i in range(len(channels)))


def _parse_nnunet_labels(value: object, json_path: Path) -> dict[str, int]:
    if not isinstance(value, dict) or not value:
        raise DataError(
            json_path,
            "'labels' must be a non-empty object mapping class name to value, "
            f'e.g. {{"background": 0, "tumour": 1}}; found {_json_type(value)}',
        )
    labels: dict[str, int] = {}
    for name, v in value.items():
        if name.lower() == "ignore":
            raise DataError(
                json_path,
                "label 'ignore' (nnU-Net's sparse-annotation label) is not supported; "
                "remove it and annotate every voxel",
            )
        if isinstance(v, (list, tuple)):
            raise DataError(
                json_path,
                f"label {brief(name)} is region-based ({brief(v)}); medflow supports one "
                "integer value per class",
            )
        if not isinstance(v, int) or isinstance(v, bool):
            raise DataError(
                json_path, f"label {brief(name)} has value {brief(v)}; expected an integer"
            )
        labels[name] = v
    return _checked_labels(labels, json_path)


def _parse_msd_labels(value: object, json_path: Path) -> dict[str, int]:
    if not isinstance(value, dict) or not value:
        raise DataError(
            json_path,
            "'labels' must be a non-empty object mapping value to class name, "
            f'e.g. {{"0": "background", "1": "tumour"}}; found {_json_type(value)}',
        )
    labels: dict[str, int] = {}
    for v, name in value.items():
        if not _INDEX.fullmatch(v) or not isinstance(name, str):
            raise DataError(
                json_path,
                f"label entry {brief(v)}: {brief(name)} must map an integer string to a class name",
            )
        if name in labels:
            raise DataError(json_path, f"class name {brief(name)} is used for two label values")
        labels[name] = int(v)
    return _checked_labels(labels, json_path)


def _checked_labels(labels: dict[str, int], json_path: Path) -> dict[str, int]:
    values = sorted(labels.values())
    if 0 not in values:
        raise DataError(json_path, "labels must include background with value 0")
    # one output channel per class: the values must index them without gaps
    if values != list(range(len(values))):
        raise DataError(
            json_path,
            f"label values must be exactly 0..{len(values) - 1} with no gaps or repeats; "
            f"found {brief(values)}",
        )
    return dict(sorted(labels.items(), key=lambda item: item[1]))


def _parse_ending(value: object, json_path: Path) -> str:
    if not isinstance(value, str):
        raise DataError(json_path, f"'file_ending' must be a string, not {_json_type(value)}")
    try:
        ending = io.file_ending(f"x{value}")
    except DataError:
        ending = None
    # exact match: ".seg.nii.gz" would pass io.file_ending but is not an ending we can pair on
    if ending != value:
        raise DataError(
            json_path,
            f"file_ending {brief(value)} is not supported; expected one of "
            f"{', '.join(io.SUPPORTED_ENDINGS)}",
        )
    return value


def _visible_files(folder: Path) -> list[Path]:
    """Files in ``folder``, sorted, leaving out hidden ones (``.DS_Store``, macOS ``._*``)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


# ------------------------------------------------------------------------------- nnU-Net v2


def _load_nnunet(root: Path, name: str, meta: dict[str, Any], json_path: Path) -> DatasetSpec:
    key = "channel_names" if "channel_names" in meta else "modality"
    channels = _parse_channels(_require(meta, key, NNUNET, json_path), key, json_path)
    labels = _parse_nnunet_labels(_require(meta, "labels", NNUNET, json_path), json_path)
    ending = _parse_ending(_require(meta, "file_ending", NNUNET, json_path), json_path)
    num_training = _require(meta, "numTraining", NNUNET, json_path)
    if not isinstance(num_training, int) or isinstance(num_training, bool):
        raise DataError(json_path, f"'numTraining' must be an integer, not {brief(num_training)}")

    images_tr = root / "imagesTr"
    if not images_tr.is_dir():
        raise DataError(images_tr, "folder not found; the training images belong here")
    training = _pair_nnunet(images_tr, root / "labelsTr", ending, channels, labels_required=True)
    training = _with_raters(training, root / "ratersTr", root / "labelsTr", ending)
    if not training:
        raise DataError(
            images_tr, f"holds no training cases; expected files named {{case}}_0000{ending}"
        )
    labels_ts = root / "labelsTs"
    test = _pair_nnunet(
        root / "imagesTs",
        labels_ts,
        ending,
        channels,
        # labelsTs is optional, but once present it must label every test case, so that an
        # evaluation never silently skips one
        labels_required=bool(_label_files(labels_ts, ending)),
    )
    test = _with_raters(test, root / "ratersTs", labels_ts, ending)
    return DatasetSpec(root, name, NNUNET, channels, labels, ending, training, test)


def _pair_nnunet(
    images_dir: Path,
    labels_dir: Path,
    ending: str,
    channels: tuple[str, ...],
    labels_required: bool,
) -> tuple[Case, ...]:
    images = _channel_files(images_dir, ending, channels)
    labels = _label_files(labels_dir, ending)
    for case_id, label in labels.items():
        if case_id not in images:
            expected = images_dir / f"{case_id}_0000{ending}"
            raise DataError(label, f"label has no image; expected {expected}")
    cases = []
    for case_id in sorted(images):
        label = labels.get(case_id)
        if label is None and labels_required:
            expected = labels_dir / f"{case_id}{ending}"
            raise DataError(images[case_id][0], f"image has no label; expected {expected}")
        cases.append(Case(case_id, images[case_id], label))
    return tuple(cases)


def _channel_files(
    folder: Path, ending: str, channels: tuple[str, ...]
) -> dict[str, tuple[Path, ...]]:
    """Group ``{case}_{XXXX}{ending}`` files by case, requiring channels ``0..n-1``."""
    n = len(channels)
    found: dict[str, dict[int, Path]] = {}
    for path in _visible_files(folder):
        if not path.name.endswith(ending):
            continue  # notes, previews, ...: not ours to judge
        match = _CHANNEL.match(path.name[: -len(ending)])
        if match is None:
            raise DataError(
                path, f"image name lacks the _XXXX channel suffix; expected {{case}}_0000{ending}"
            )
        index = int(match["channel"])
        if index >= n:
            raise DataError(
                path,
                f"channel index {index}, but channel_names declares {n} channel(s) "
                f"(_0000.._{n - 1:04d})",
            )
        found.setdefault(match["case"], {})[index] = path
    for case_id, files in found.items():
        for index in range(n):
            if index not in files:
                missing = folder / f"{case_id}_{index:04d}{ending}"
                raise DataError(
                    missing,
                    f"not found: channel {index} ({channels[index]}) of case '{case_id}'; "
                    f"channel_names declares {n} channels",
                )
    return {case_id: tuple(files[i] for i in range(n)) for case_id, files in found.items()}


def _label_files(folder: Path, ending: str) -> dict[str, Path]:
    return {p.name[: -len(ending)]: p for p in _visible_files(folder) if p.name.endswith(ending)}


def _with_raters(
    cases: tuple[Case, ...], folder: Path, labels_dir: Path, ending: str
) -> tuple[Case, ...]:
    """``cases`` with their annotations from ``folder`` (``ratersTr``/``ratersTs``), see
    :func:`rater_annotations`; unchanged where ``folder`` holds no rater files."""
    labelled = {c.case_id: c.label for c in cases if c.label is not None}
    found = rater_annotations(labelled, folder, labels_dir, ending)
    if not found:
        return cases
    return tuple(replace(c, raters=found[c.case_id]) if c.label else c for c in cases)


def rater_annotations(
    labels: dict[str, Path], folder: Path, labels_dir: Path, ending: str
) -> dict[str, tuple[Path, ...]]:
    """Every annotation of each case of ``labels`` (case id -> label map, rater 0), rater 0
    first, then ``folder/{case}_rater01{ending}`` ...; empty where ``folder`` holds no rater
    files. The one reader of the raters layout, for training and for evaluation.

    Raises:
        DataError: a rater file is misnamed, numbered 00 or twice, names a case without a
            label in ``labels_dir``, or a case lacks raters that another case has.
    """
    found = _rater_files(folder, ending)
    if not found:
        return {}
    for case_id, files in found.items():
        if case_id not in labels:
            expected = labels_dir / f"{case_id}{ending}"
            raise DataError(
                files[min(files)], f"rater annotation has no label; expected {expected} (rater 0)"
            )
    count = max(max(files) for files in found.values())
    out = {}
    for case_id, label in labels.items():
        files = found.get(case_id, {})
        missing = [i for i in range(1, count + 1) if i not in files]
        if missing:
            raise DataError(
                folder / f"{case_id}_rater{missing[0]:02d}{ending}",
                f"not found: case '{case_id}' has {len(files) + 1} annotation(s), but "
                f"{folder.name} holds rater01..rater{count:02d} for other cases; every case "
                "needs the same raters",
            )
        out[case_id] = (label, *(files[i] for i in range(1, count + 1)))
    return out


def _rater_files(folder: Path, ending: str) -> dict[str, dict[int, Path]]:
    """``{case}_raterNN{ending}`` files of ``folder`` by case and rater index."""
    found: dict[str, dict[int, Path]] = {}
    for path in _visible_files(folder):
        if not path.name.endswith(ending):
            continue
        match = _RATER.match(path.name[: -len(ending)])
        if match is None:
            raise DataError(
                path,
                f"rater file name lacks the _raterNN suffix; expected {{case}}_rater01{ending}",
            )
        index = int(match["index"])
        if index == 0:
            raise DataError(
                path, "rater 0 is the case's label map; number the other raters from _rater01"
            )
        files = found.setdefault(match["case"], {})
        if index in files:
            raise DataError(path, f"rater {index} is already given by {files[index]}")
        files[index] = path
    return found


# ------------------------------------------------------------------------------------- MSD


def _load_msd(root: Path, name: str, meta: dict[str, Any], json_path: Path) -> DatasetSpec:
    channels = _parse_channels(_require(meta, "modality", MSD, json_path), "modality", json_path)
    labels = _parse_msd_labels(_require(meta, "labels", MSD, json_path), json_path)
    entries = _require(meta, "training", MSD, json_path)
    if not isinstance(entries, list):
        raise DataError(json_path, f"'training' must be an array, not {_json_type(entries)}")
    if not entries:
        raise DataError(json_path, "'training' is empty; the dataset has no training cases")

    pairs: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("image"), str)
            and isinstance(entry.get("label"), str)
        ):
            raise DataError(
                json_path,
                f"training[{i}] must be an object with string 'image' and 'label' paths",
            )
        pairs.append((entry["image"], entry["label"]))
    ending = io.file_ending(root / pairs[0][0])

    training = []
    for image, label in pairs:
        image_path = _listed_file(root, image, ending, "training", json_path)
        label_path = _listed_file(root, label, ending, "training", json_path)
        training.append(Case(_case_id(image_path, ending), (image_path,), label_path))
    _reject_unlisted(root / "imagesTr", [c.images[0] for c in training], ending, "training")
    _reject_unlisted(root / "labelsTr", [c.label for c in training], ending, "training")

    test = _msd_test(root, meta, ending, json_path)
    return DatasetSpec(root, name, MSD, channels, labels, ending, _sorted_unique(training), test)


def _msd_test(root: Path, meta: dict[str, Any], ending: str, json_path: Path) -> tuple[Case, ...]:
    listed = meta.get("test")
    if listed is None:
        # no list: take imagesTs from disk, as for nnU-Net
        images = [p for p in _visible_files(root / "imagesTs") if p.name.endswith(ending)]
    elif isinstance(listed, list):
        images = []
        for i, entry in enumerate(listed):
            # the MSD lists plain paths; some re-packagings use {"image": path}
            image = entry.get("image") if isinstance(entry, dict) else entry
            if not isinstance(image, str):
                raise DataError(json_path, f"test[{i}] must be an image path string")
            images.append(_listed_file(root, image, ending, "test", json_path))
        _reject_unlisted(root / "imagesTs", images, ending, "test")
    else:
        raise DataError(json_path, f"'test' must be an array, not {_json_type(listed)}")

    labels_dir = root / "labelsTs"
    labels = _label_files(labels_dir, ending)
    # once labelsTs holds labels it must label every test case (as for nnU-Net)
    labels_required = bool(labels)
    cases = []
    for image in images:
        case_id = _case_id(image, ending)
        label = labels.pop(case_id, None)
        if label is None and labels_required:
            expected = labels_dir / f"{case_id}{ending}"
            raise DataError(image, f"image has no label; expected {expected}")
        cases.append(Case(case_id, (image,), label))
    if labels:
        raise DataError(next(iter(labels.values())), "label has no image in imagesTs")
    return _sorted_unique(cases)


def _listed_file(root: Path, entry: str, ending: str, key: str, json_path: Path) -> Path:
    path = root / entry  # "./imagesTr/x.nii.gz": pathlib drops the "."
    if not path.name.endswith(ending):
        raise DataError(
            path, f"listed in {json_path.name} '{key}' with an ending other than {ending}"
        )
    # os.path.isfile, unlike Path.is_file, answers False for a name too long or holding NUL
    if not os.path.isfile(path):
        raise DataError(path, f"not found; listed in {json_path.name} '{key}'")
    return path


def _reject_unlisted(folder: Path, listed: Iterable[Path | None], ending: str, key: str) -> None:
    # the MSD's strict pairing: a file on disk that dataset.json does not pair is an image
    # without a label or a label without an image
    known = {p.resolve() for p in listed if p is not None}
    for path in _visible_files(folder):
        if path.name.endswith(ending) and path.resolve() not in known:
            raise DataError(path, f"not listed in dataset.json '{key}'; add it or remove it")


def _case_id(path: Path, ending: str) -> str:
    return path.name[: -len(ending)]


def _sorted_unique(cases: list[Case]) -> tuple[Case, ...]:
    seen: dict[str, Case] = {}
    for case in cases:
        if case.case_id in seen:
            raise DataError(
                case.images[0],
                f"case id '{case.case_id}' repeats {seen[case.case_id].images[0]}",
            )
        seen[case.case_id] = case
    return tuple(seen[k] for k in sorted(seen))


# ------------------------------------------------------------------------------- find_cases


def find_cases(path: str | Path, file_ending: str | None, num_channels: int) -> list[Case]:
    """Group prediction inputs into cases.

    Files named ``{case}_{XXXX}{ending}`` form one case per ``{case}`` when ``{case}_0000``
    exists, and must then be exactly ``_0000`` to ``_{num_channels-1}``. Any other file is a
    case of its own holding every channel (a single-channel image, an RGB PNG, an MSD 4D
    NIfTI); its channel count is checked when it is read. A single-channel file named
    ``{case}_0000`` is case ``{case}``, so predictions are named as nnU-Net names them.

    Args:
        path: a folder of inputs, or a single file.
        file_ending: only files with this ending (e.g. ``".nii.gz"``), or ``None`` for any
            supported ending. Matched without regard to case.
        num_channels: channels the model takes.

    Returns:
        The cases, sorted by case id, each with ``label=None``.

    Raises:
        DataError: ``path`` is missing, holds no matching file, a case has the wrong number of
            channel files, or two files claim the same case or channel.
        ValueError: ``num_channels`` is below 1.
        MedflowError: ``file_ending`` is not a supported ending.
    """
    if num_channels < 1:
        raise ValueError(f"num_channels must be at least 1, got {num_channels}")
    endings = _wanted_endings(file_ending)
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(path, "not found; expected an image file or a folder of images")
    wanted = " or ".join(endings)
    if path.is_file():
        ending = _match_ending(path.name, endings)
        if ending is None:
            raise DataError(path, f"is not an image file; expected a name ending in {wanted}")
        return [_single_file_case(path, ending, num_channels)]

    groups: dict[str, dict[int, Path]] = {}
    plain: list[Path] = []
    for file in _visible_files(path):
        ending = _match_ending(file.name, endings)
        if ending is None:
            continue
        match = _CHANNEL.match(file.name[: -len(ending)])
        if match is None:
            plain.append(file)
            continue
        channel_files = groups.setdefault(match["case"], {})
        index = int(match["channel"])
        if index in channel_files:
            raise DataError(file, f"channel {index} is already given by {channel_files[index]}")
        channel_files[index] = file
    if not groups and not plain:
        raise DataError(path, f"holds no image files ending in {wanted}")

    cases: list[Case] = []
    for case_id, files in groups.items():
        if 0 in files:
            cases.append(Case(case_id, _channels_of(path, case_id, files, num_channels), None))
            continue
        for index, file in files.items():
            if index < num_channels and num_channels > 1:
                expected = path / f"{case_id}_0000{_ending_of(file, endings)}"
                raise DataError(
                    file, f"channel {index} of case '{case_id}', but {expected} is missing"
                )
            plain.append(file)  # e.g. scan_2023.png: a date, not a channel
    cases += [Case(f.name[: -len(_ending_of(f, endings))], (f,), None) for f in plain]
    return list(_sorted_unique(cases))


def _wanted_endings(file_ending: str | None) -> tuple[str, ...]:
    if file_ending is None:
        return io.SUPPORTED_ENDINGS  # ".nii.gz" comes before ".nii", so the longest matches
    if file_ending.lower() not in io.SUPPORTED_ENDINGS:
        raise MedflowError(
            f"file ending {file_ending!r} is not supported; expected one of "
            f"{', '.join(io.SUPPORTED_ENDINGS)}"
        )
    return (file_ending,)


def _match_ending(name: str, endings: tuple[str, ...]) -> str | None:
    """The ending of ``name`` among ``endings`` as spelled in ``name`` (``.PNG`` stays)."""
    lower = name.lower()
    for ending in endings:
        if lower.endswith(ending.lower()) and len(name) > len(ending):
            return name[-len(ending) :]
    return None


def _ending_of(path: Path, endings: tuple[str, ...]) -> str:
    ending = _match_ending(path.name, endings)
    assert ending is not None, path  # only matched files reach here
    return ending


def _single_file_case(path: Path, ending: str, num_channels: int) -> Case:
    stem = path.name[: -len(ending)]
    match = _CHANNEL.match(stem)
    if match is not None and int(match["channel"]) < num_channels:
        if num_channels > 1:
            raise DataError(
                path,
                f"is one channel file of case '{match['case']}'; pass the folder so all "
                f"{num_channels} channel files are found",
            )
        stem = match["case"]
    return Case(stem, (path,), None)


def _channels_of(
    folder: Path, case_id: str, files: dict[int, Path], num_channels: int
) -> tuple[Path, ...]:
    if sorted(files) == list(range(num_channels)):
        return tuple(files[i] for i in range(num_channels))
    expected = f"_0000.._{num_channels - 1:04d}"
    extra = sorted(i for i in files if i >= num_channels)
    if extra:
        raise DataError(
            files[extra[0]],
            f"case '{case_id}' has {len(files)} channel files; the model takes "
            f"{num_channels} ({expected})",
        )
    missing = next(i for i in range(num_channels) if i not in files)
    ending = files[0].name[len(case_id) + 5 :]  # after "{case}_0000"
    raise DataError(
        folder / f"{case_id}_{missing:04d}{ending}",
        f"not found: case '{case_id}' has {len(files)} channel files; the model takes "
        f"{num_channels} ({expected})",
    )


# --------------------------------------------------------------------------- verify_dataset


def verify_dataset(root: str | Path) -> list[str]:
    """Open every file of a dataset and report every problem found.

    Structural problems come from :func:`load_dataset` (and stop there, as one problem). Then
    each case is read, one at a time to keep memory low, and checked for: unreadable files,
    NaN/Inf in an image, a channel count other than ``channel_names``', image and label
    shapes or (NIfTI) affines that disagree, label values not declared in ``dataset.json``,
    a 2D image among 3D volumes or a 3D volume among 2D images; and ``numTraining`` must equal
    the number of training cases. A case's other raters are checked as its label is.

    Args:
        root: the dataset folder.

    Returns:
        One line per problem, each beginning with the offending file's path; empty when the
        dataset is sound.
    """
    try:
        spec = load_dataset(root)
    except DataError as exc:
        return [str(exc)]
    problems = _check_num_training(spec)
    allowed = sorted(spec.labels.values())
    geometries: dict[Path, io.Geometry] = {}
    for case in spec.training + spec.test:
        case_problems, image = _check_case(case, len(spec.channel_names), allowed)
        problems += case_problems
        if image is not None:
            geometries[case.images[0]] = image.geometry
    return problems + _mixed_dims(spec, geometries)


_KIND = {2: ("a 2D image", "2D images"), 3: ("a 3D volume", "3D volumes")}


def _mixed_dims(spec: DatasetSpec, geometries: dict[Path, io.Geometry]) -> list[str]:
    """A dataset holds 2D images or 3D volumes, not both (a model trained on 2D images refuses
    volumes). The kind most training cases have, the first case's on a tie, is the dataset's;
    every case of the other kind is reported."""
    train = [geometries[c.images[0]] for c in spec.training if c.images[0] in geometries]
    if not train:
        return []
    count = {d: sum(g.dims == d for g in train) for d in (2, 3)}
    kind = train[0].dims if count[2] == count[3] else max(count, key=count.__getitem__)
    problems = []
    for case in spec.training + spec.test:
        geometry = geometries.get(case.images[0])
        if geometry is not None and geometry.dims != kind:
            problems.append(
                f"{case.images[0]}: is {_KIND[geometry.dims][0]} of shape {geometry.shape}, but "
                f"{count[kind]} of {len(train)} training cases are {_KIND[kind][1]}; a dataset "
                "holds 2D images or 3D volumes, not both"
            )
    return problems


def _check_num_training(spec: DatasetSpec) -> list[str]:
    json_path = spec.root / "dataset.json"
    # load_dataset has parsed this file already, so it is valid JSON
    declared = json.loads(json_path.read_text(encoding="utf-8")).get("numTraining")
    if spec.layout == MSD and not isinstance(declared, int):
        return []  # optional in the MSD layout
    if declared != len(spec.training):
        return [
            f"{json_path}: numTraining is {declared}, but {len(spec.training)} training "
            "cases were found"
        ]
    return []


def _check_case(
    case: Case, num_channels: int, allowed: list[int]
) -> tuple[list[str], io.Volume | None]:
    """The problems of one case, and its image where it could be read."""
    problems: list[str] = []
    image = None
    try:
        image = io.read_image(case.images)
    except DataError as exc:
        problems.append(str(exc))
    if image is not None and image.array.shape[0] != num_channels:
        problems.append(
            f"{case.images[0]}: case '{case.case_id}' has {image.array.shape[0]} image "
            f"channel(s), but dataset.json declares {num_channels}"
        )
    # the label, then raters 1.. (raters[0] is the label itself)
    annotations = () if case.label is None else (case.label, *case.raters[1:])
    for path in annotations:
        problems += _annotation_problems(path, case, image, allowed)
    return problems, image


def _annotation_problems(
    path: Path, case: Case, image: io.Volume | None, allowed: list[int]
) -> list[str]:
    """The problems of one label map (the label or another rater's) of ``case``."""
    try:
        label = io.read_label(path)
    except DataError as exc:
        return [str(exc)]
    problems = []
    undeclared = sorted(set(np.unique(label.array).tolist()) - set(allowed))
    if undeclared:
        problems.append(
            f"{path}: label values {undeclared} are not declared in dataset.json "
            f"(allowed: {', '.join(map(str, allowed))})"
        )
    if image is not None:
        problems += _grid_problems(image.geometry, label.geometry, case, path)
    return problems


def _grid_problems(image: io.Geometry, label: io.Geometry, case: Case, path: Path) -> list[str]:
    where = f"{path}: label"
    if image.shape != label.shape:
        return [
            f"{where} has spatial shape {label.shape}, but image {case.images[0]} has {image.shape}"
        ]
    if image.ending not in io.NIFTI_ENDINGS or label.ending not in io.NIFTI_ENDINGS:
        return []  # PNG and TIFF carry no geometry beyond their shape
    problems = []
    if not np.allclose(image.spacing, label.spacing, rtol=0, atol=_SPACING_TOL):
        problems.append(
            f"{where} spacing {_fmt(label.spacing)} differs from image {case.images[0]} "
            f"spacing {_fmt(image.spacing)}"
        )
    if not np.allclose(image.affine[:3, 3], label.affine[:3, 3], rtol=0, atol=_ORIGIN_TOL):
        problems.append(
            f"{where} origin {_fmt(label.affine[:3, 3])} differs from image "
            f"{case.images[0]} origin {_fmt(image.affine[:3, 3])}"
        )
    if not np.allclose(_direction(image), _direction(label), rtol=0, atol=_DIRECTION_TOL):
        problems.append(f"{where} orientation differs from image {case.images[0]}")
    return problems


def _direction(geometry: io.Geometry) -> np.ndarray:
    """Direction cosines: the affine's columns scaled to unit length."""
    rotation = geometry.affine[:3, :3]
    norms = np.linalg.norm(rotation, axis=0)
    return rotation / np.where(norms > 0, norms, 1.0)


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
