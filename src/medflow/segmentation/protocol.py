"""train -> predict -> evaluate, written once: every benchmark and harness is a list of arms
handed to :func:`run_protocol`.

An :class:`Arm` is a training dataset, the ``TrainConfig`` fields to train it with, the
sampling settings to predict with, and the dataset to score on. For every arm and seed the
runner trains into ``<out>/runs/<arm>_seed<seed>``, predicts the test images with the final
(EMA) checkpoint once per setting and scores them at native resolution against the test
labels (``medflow evaluate``: Dice, IoU, HD95, ASSD per class), then writes the run's rows to
its ``result.json``. Every protocol therefore trains with the same checkpoint choice, the
same thread setting (``TrainConfig.threads``, the runner's own by default) and the same
evaluation, and its rows carry the same fields:

``arm``, the arm's tags, ``seed``, ``setting``, ``options`` (the sampling options the mask was
drawn with, resolved), ``train_steps``, ``train_seconds``, ``best_val_dice``, ``best_step``,
``predict_seconds``, ``foreground`` and ``per_class`` (``summary.json``'s means), ``run`` and
``checkpoint`` (relative to ``out``), and whatever the arm's ``measure`` adds.

With ``reuse``, a run whose ``result.json`` holds the same arm (data, fields, settings, test
data) and seed is read back rather than trained again, so a protocol that was killed can be
finished and extended. Datasets inside ``out`` are keyed relative to it, so a copied or moved
protocol folder that holds its own datasets is reused as well. An arm with no settings only
trains (a protocol that scores its checkpoints its own way, as the rater benchmark does, gets
them from the rows).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medflow import __version__
from medflow.data.io import atomic_write
from medflow.engine.runtime import machine_info
from medflow.metrics.summary import evaluate_folders
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.inference import SamplingOptions
from medflow.segmentation.predict import Predictor, predict_folder
from medflow.segmentation.train import TrainResult, train

RESULT = "result.json"


@dataclass(frozen=True)
class Setting:
    """One way to predict with a trained arm.

    Attributes:
        label: its name in rows and tables (``"euler-4"``); unique within the arm.
        options: the sampling options (``"auto"``: the method's default).
    """

    label: str
    options: SamplingOptions = SamplingOptions()

    @property
    def tag(self) -> str:
        """``label`` as a folder name."""
        return _slug(self.label)


# measure(predictor, arm, setting) -> extra row fields; it may return ``"slow": True``, and a
# setting measured slow on an arm's first seed is skipped on its later seeds
Measure = Callable[[Predictor, "Arm", Setting], dict]


@dataclass(frozen=True)
class Arm:
    """One condition of a protocol.

    Attributes:
        name: unique within the protocol; its run folders are ``<name>_seed<seed>``.
        data: the training dataset (nnU-Net raw v2 or MSD folder).
        train: ``TrainConfig`` fields (the seed is set per run; ``threads`` defaults to the
            runner's own, so training and prediction run under one thread setting).
        settings: how to predict; none: train only.
        test: the dataset whose ``imagesTs``/``labelsTs`` are scored (default: ``data``).
        tags: fields copied into every row (dataset, budget, method, condition, ...).
        measure: extra measurements of each setting (the bench's latency and cost).
    """

    name: str
    data: Path
    train: dict = field(default_factory=dict)
    settings: tuple[Setting, ...] = (Setting("default"),)
    test: Path | None = None
    tags: dict = field(default_factory=dict)
    measure: Measure | None = None

    def config(self, seed: int) -> TrainConfig:
        return TrainConfig(**{"threads": torch.get_num_threads(), **self.train, "seed": seed})

    def key(self, seed: int, out: Path | None = None) -> dict:
        """What a finished run must match to be reused (JSON-normalised). Datasets inside
        ``out`` are recorded relative to it (:func:`_portable`), so a protocol folder that
        holds its own datasets (the AlignFlow harness's) can be moved or copied and still
        be reused."""
        key = {
            "arm": self.name,
            "data": _portable(self.data, out),
            "test": _portable(self.test or self.data, out),
            "config": self.config(seed).to_dict(),
            "settings": [[s.label, dataclasses.asdict(s.options)] for s in self.settings],
        }
        return json.loads(json.dumps(key))


def _portable(path: str | Path, out: Path | None) -> str:
    """``path`` resolved, as ``out/…`` relative to ``out`` when it lies inside it (a stored
    absolute path inside ``out`` is read the same way), else absolute."""
    path = Path(path).resolve()
    if out is not None and path.is_relative_to(root := Path(out).resolve()):
        return str(Path("out") / path.relative_to(root))
    return str(path)


def _slug(text: str) -> str:
    """A folder-safe form of a display name (``"source+aligned K=5"`` -> ``source_aligned_K5``)."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.\-]+", "_", text.replace("=", ""))).strip("_")


def run_dir(out: Path, arm: Arm, seed: int) -> Path:
    return Path(out) / "runs" / f"{_slug(arm.name)}_seed{seed}"


def run_arm(
    arm: Arm,
    seed: int,
    out: Path,
    *,
    device: str = "auto",
    reuse: bool = False,
    skip: frozenset[str] = frozenset(),
) -> list[dict]:
    """Train one arm with one seed, predict and score every setting not in ``skip``; the
    rows (also written to the run's ``result.json``). See the module docstring."""
    out, run = Path(out), run_dir(out, arm, seed)
    key = arm.key(seed, out)
    if reuse and (record := _finished(run, key, out)) is not None:
        return record
    result = train(arm.data, run, arm.config(seed), device=device, force=True, quiet=True)
    rows = [_train_row(arm, seed, result, out)] if not arm.settings else []
    if arm.settings:
        predictor = Predictor(result.final_checkpoint, device)
        for setting in arm.settings:
            if setting.label not in skip:
                rows.append(_score(arm, seed, setting, predictor, result, out))
    atomic_write(run / RESULT, lambda p: p.write_text(json.dumps({"key": key, "rows": rows})))
    return rows


def _finished(run: Path, key: dict, out: Path) -> list[dict] | None:
    path = run / RESULT
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    stored = record.get("key")
    return record["rows"] if stored is not None and _current(stored, out) == key else None


def _current(key: dict, out: Path) -> dict:
    """A stored key as today's code writes it: a config or sampling options written before a
    field existed read with the value that reproduces them (``TrainConfig.from_dict``, the
    options' defaults), so a new field with an old-behaviour default does not force a
    retrain, and an absolute dataset path inside ``out`` (written before keys were
    portable) read relative to ``out``."""
    try:
        config = TrainConfig.from_dict(key["config"]).to_dict()
        settings = [
            [label, dataclasses.asdict(SamplingOptions(**o))] for label, o in key["settings"]
        ]
        paths = {name: _stored_path(key[name], out) for name in ("data", "test")}
    except (KeyError, TypeError, ValueError):
        return key
    return json.loads(json.dumps({**key, **paths, "config": config, "settings": settings}))


def _stored_path(stored: str, out: Path) -> str:
    # a portable path ("out/...") is kept; an absolute one is portable if it is inside out
    return stored if not Path(stored).is_absolute() else _portable(stored, out)


def _train_row(arm: Arm, seed: int, result: TrainResult, out: Path) -> dict:
    return {
        "arm": arm.name,
        **arm.tags,
        "seed": seed,
        "train_steps": result.steps,
        "train_seconds": result.seconds,
        "best_val_dice": result.best_val_dice,
        "best_step": result.best_step,
        "run": str(result.run_dir.relative_to(out)),
        "checkpoint": str(result.final_checkpoint.relative_to(out)),
    }


def _score(
    arm: Arm, seed: int, setting: Setting, predictor: Predictor, result: TrainResult, out: Path
) -> dict:
    """Predict the test images with one setting into ``pred_<tag>``, score them into
    ``eval_<tag>`` and measure (``arm.measure``)."""
    test = Path(arm.test or arm.data)
    pred, ev = result.run_dir / f"pred_{setting.tag}", result.run_dir / f"eval_{setting.tag}"
    t0 = time.perf_counter()
    predict_folder(
        result.final_checkpoint,
        test / "imagesTs",
        pred,
        device=str(predictor.device),
        force=True,
        quiet=True,
        options=setting.options,
    )
    seconds = time.perf_counter() - t0
    summary = evaluate_folders(pred, test / "labelsTs", ev, force=True)
    measured = arm.measure(predictor, arm, setting) if arm.measure else {}
    return {
        **_train_row(arm, seed, result, out),
        "setting": setting.label,
        "options": dataclasses.asdict(predictor.mask_options(setting.options)),
        "predict_seconds": seconds,
        "foreground": summary["foreground_mean"],
        "per_class": summary["mean"],
        **measured,
    }


def run_protocol(
    arms: Sequence[Arm],
    seeds: Sequence[int],
    out: str | Path,
    *,
    device: str = "auto",
    reuse: bool = False,
    say: Callable[[str], None] = lambda _: None,
    jobs: int = 1,
) -> list[dict]:
    """Every arm with every seed (:func:`run_arm`), in order; the rows of all of them.

    A setting whose measurement says ``"slow": True`` on an arm's first seed is skipped on
    its later seeds (each row records ``seeds_evaluated``). With ``jobs > 1`` the runs go to
    that many worker processes (each trains with its arm's ``threads``; the arms must then be
    picklable, so no ``measure``).
    """
    out = Path(out)
    names = [a.name for a in arms]
    if len(set(names)) != len(names) or len({_slug(n) for n in names}) != len(names):
        raise ValueError(f"arm names must be unique as folder names, got {names}")
    if not seeds:
        raise ValueError("need at least one seed")
    if jobs > 1:
        return _in_processes(arms, seeds, out, device, reuse, jobs)
    rows = []
    for arm in arms:
        slow: set[str] = set()
        for seed in seeds:
            say(f"{arm.name}, seed {seed}")
            got = run_arm(arm, seed, out, device=device, reuse=reuse, skip=frozenset(slow))
            slow |= {r["setting"] for r in got if r.get("slow")}
            rows += got
    for r in rows:
        r["seeds_evaluated"] = 1 if r.get("slow") else len(seeds)
    return rows


def _in_processes(arms, seeds, out, device, reuse, jobs) -> list[dict]:
    if any(a.measure for a in arms):
        raise ValueError("arms with a measure run in one process (jobs=1)")
    runs = [(a, s) for a in arms for s in seeds]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_arm, a, s, out, device=device, reuse=reuse) for a, s in runs]
        rows = [r for f in futures for r in f.result()]
    for r in rows:
        r["seeds_evaluated"] = len(seeds)
    return rows


def ensemble_rows(
    rows: list[dict],
    members: Sequence[str],
    name: str,
    test: Path,
    out: str | Path,
    *,
    options: SamplingOptions = SamplingOptions(),
    device: str = "auto",
) -> list[dict]:
    """Score the ensemble of the arms ``members`` (their final checkpoints' soft masks
    averaged, :mod:`medflow.segmentation.ensemble`) for every seed all of them were run
    with: predicted with ``options`` into ``<out>/ensembles/<name>_seed<seed>`` and scored
    against ``test``'s ``labelsTs`` as every setting is. Each row names its ``members``;
    its train steps and seconds are the members' sums (what the ensemble cost to train)."""
    out = Path(out)
    by_seed: dict[int, dict[str, dict]] = {}
    for r in rows:
        if r["arm"] in members:
            by_seed.setdefault(r["seed"], {}).setdefault(r["arm"], r)
    scored = []
    for seed, found in sorted(by_seed.items()):
        if len(found) < len(members):
            continue
        parts = [found[m] for m in members]
        folder = out / "ensembles" / f"{_slug(name)}_seed{seed}"
        t0 = time.perf_counter()
        checkpoints = [out / p["checkpoint"] for p in parts]
        predict_folder(checkpoints, test / "imagesTs", folder / "pred", options=options,
                       device=device, force=True, quiet=True)  # fmt: skip
        seconds = time.perf_counter() - t0
        summary = evaluate_folders(folder / "pred", test / "labelsTs", folder / "eval", force=True)
        scored.append(
            {
                "arm": name,
                "members": list(members),
                "seed": seed,
                "setting": "ensemble",
                "options": dataclasses.asdict(options),
                "train_steps": sum(p["train_steps"] for p in parts),
                "train_seconds": sum(p["train_seconds"] for p in parts),
                "predict_seconds": seconds,
                "foreground": summary["foreground_mean"],
                "per_class": summary["mean"],
                "seeds_evaluated": len(by_seed),
            }
        )
    return scored


def results_record(rows: list[dict], config: dict, device: str = "auto", **extra) -> dict:
    """The one results schema: versions, the machine, the protocol's config, the rows, and
    anything the protocol adds."""
    return {
        "medflow": __version__,
        "torch": torch.__version__,
        "machine": {**machine_info(), "threads": torch.get_num_threads(), "device": device},
        "config": config,
        "rows": rows,
        **extra,
    }


def write_results(out: Path, record: dict, table: str, name: str = "results") -> None:
    """``<name>.json`` and ``<name>.md`` (the table) into ``out``, atomically."""
    atomic_write(out / f"{name}.md", lambda p: p.write_text(table))
    atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
