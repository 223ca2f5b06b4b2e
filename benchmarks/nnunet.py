"""nnU-Net v2 2d against medflow on the embedded sets, at equal training time and threads.

Training time is each run's own CPU time (one thread: CPU-minutes), for nnU-Net and medflow
alike (``budget_clock="cpu"``), so runs side by side, or other jobs on the machine, do not
shorten one method's run more than the other's.

For every embedded dataset named (built into ``<work>/data`` as ``benchmarks/planned.py``
builds them), three methods, each seed a run of ``--budget`` on ``--threads`` threads (one by
default), ``--jobs`` runs side by side (one per core):

* ``nnunet``: nnU-Net v2's own ``2d`` configuration, planned and preprocessed by
  ``nnUNetv2_plan_and_preprocess``, trained by ``benchmarks/nnunet_driver.py`` in nnU-Net's
  own Python (``--nnunet-python``; nnU-Net's plan, network, augmentation, loss with deep
  supervision, SGD and poly learning rate, with the number of iterations fixed by a timed
  probe so that the run and its schedule end at the budget), predicted with nnU-Net's
  sliding window and mirroring. Trained on medflow's own training cases and validated on
  medflow's validation cases (written as nnU-Net's ``splits_final.json``, fold 0), so both
  see the same data; ``--fold all`` trains on every training case instead.
* ``fixed`` and ``planned``: medflow's two arms of ``benchmarks/planned.py`` (default
  config, every slice resized to 96 x 96 / ``plan="auto"``), through the one runner
  (:func:`medflow.segmentation.protocol.run_protocol`).

Every prediction is scored by medflow's evaluation (:func:`medflow.metrics.summary.
evaluate_folders`, at native resolution against ``labelsTs``), mni152-lesions also lesion-wise
(``planned.lesion_scores``). nnU-Net's environment variables (``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results``; one results folder per run) point into
``<work>/nnunet`` and are set for its processes only.

    python benchmarks/nnunet.py --nnunet-python /work/nnunet-venv/bin/python \\
        --work /tmp/nnunet --datasets dsb-nuclei mni152-tissue mni152-lesions \\
        --seeds 0 1 2 --budget 4m --results benchmarks/results/nnunet.json

nnU-Net's environment: ``python3 -m venv VENV && VENV/bin/pip install torch==2.13.0
torchvision==0.28.0 && VENV/bin/pip install nnunetv2 -c <(echo torch==2.13.0)`` (without
the pins nnunetv2 pulls a newer torchvision, and with it a CUDA torch). ``--reuse`` reads
finished runs back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from planned import build_arms, lesion_scores, table  # noqa: E402

DRIVER = Path(__file__).with_name("nnunet_driver.py")
# nnU-Net dataset ids of the embedded sets (any free ids would do)
DATASET_IDS = {"dsb-nuclei": 501, "mni152-tissue": 502, "mni152-lesions": 503}
METHODS = {"nnunet": "nnU-Net 2d", "fixed": "medflow fixed", "planned": "medflow planned"}


@dataclass(frozen=True)
class NnunetRun:
    """One nnU-Net training run: an embedded dataset and a seed, in
    ``<work>/nnunet/runs/<dataset>_seed<seed>``."""

    dataset: str
    seed: int
    work: Path

    @property
    def folder(self) -> Path:
        return self.work / "nnunet" / "runs" / f"{self.dataset}_seed{self.seed}"

    @property
    def data(self) -> Path:
        return self.work / "data" / self.dataset


def seconds(text: str) -> float:
    """``"4m"``, ``"45s"``, ``"1.5h"`` or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    if text[-1:] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def nnunet_env(work: Path, threads: int, results: Path | None = None, da: int = 0) -> dict:
    """The environment of nnU-Net's processes: its folders, and no thread or process beyond
    ``threads`` (augmentation in-process with ``da=0``; its planner needs at least 1)."""
    root = work / "nnunet"
    env = {
        **os.environ,
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(results or root / "results"),
        "nnUNet_n_proc_DA": str(da),
        "nnUNet_def_n_proc": "1",
        "nnUNet_compile": "false",
    }
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def lay_out_raw(data: Path, work: Path, dataset: str) -> str:
    """``nnUNet_raw/DatasetNNN_Name``: links to the training images and labels and a
    ``dataset.json`` with the keys nnU-Net reads; the folder name."""
    spec = json.loads((data / "dataset.json").read_text())
    name = f"Dataset{DATASET_IDS[dataset]:03d}_" + dataset.title().replace("-", "")
    raw = work / "nnunet" / "raw" / name
    raw.mkdir(parents=True, exist_ok=True)
    for sub in ("imagesTr", "labelsTr"):
        link = raw / sub
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((data / sub).resolve(), target_is_directory=True)
    keys = ("channel_names", "labels", "numTraining", "file_ending")
    (raw / "dataset.json").write_text(json.dumps({k: spec[k] for k in keys}, indent=2) + "\n")
    return name


def medflow_split(data: Path) -> dict:
    """The training and validation cases of a default medflow run on ``data``."""
    from medflow.data.datasets import split_cases
    from medflow.data.layout import load_dataset
    from medflow.segmentation.config import TrainConfig

    cfg = TrainConfig()
    train, val = split_cases(load_dataset(data).training, cfg.val_fraction, cfg.split_seed)
    return {"train": [c.case_id for c in train], "val": [c.case_id for c in val]}


def preprocess(python: Path, work: Path, dataset: str, threads: int, reuse: bool) -> str:
    """Plan and preprocess nnU-Net 2d for one dataset (once for all seeds), and write
    medflow's split as nnU-Net's fold 0; the nnU-Net dataset name."""
    data = work / "data" / dataset
    name = lay_out_raw(data, work, dataset)
    pre = work / "nnunet" / "preprocessed" / name
    if not (reuse and (pre / "nnUNetPlans.json").is_file() and (pre / "nnUNetPlans_2d").is_dir()):
        log = work / "nnunet" / f"preprocess_{dataset}.log"
        cmd = [str(python.parent / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_IDS[dataset])]
        cmd += ["-c", "2d", "--verify_dataset_integrity", "-np", "1", "-npfp", "1", "--no_pbar"]
        with log.open("w") as out:
            done = subprocess.run(
                cmd, env=nnunet_env(work, threads, da=1), stdout=out, stderr=subprocess.STDOUT
            )
        if done.returncode != 0:
            raise SystemExit(f"{log}: nnUNetv2_plan_and_preprocess failed, see the log")
    (pre / "splits_final.json").write_text(json.dumps([medflow_split(data)], indent=2) + "\n")
    return name


def train_nnunet(python: Path, run: NnunetRun, budget: float, threads: int, fold: str) -> dict:
    """One nnU-Net run (train, predict ``imagesTs``) in nnU-Net's Python; its record."""
    run.folder.mkdir(parents=True, exist_ok=True)
    record = run.folder / "record.json"
    cmd = [str(python), str(DRIVER), "--dataset", str(DATASET_IDS[run.dataset])]
    cmd += ["--fold", fold, "--budget-seconds", str(budget), "--seed", str(run.seed)]
    cmd += ["--threads", str(threads), "--images", str(run.data / "imagesTs")]
    cmd += ["--pred", str(run.folder / "pred"), "--record", str(record)]
    env = nnunet_env(run.work, threads, results=run.folder / "results")
    with (run.folder / "log.txt").open("w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{run.folder / 'log.txt'}: nnU-Net run failed, see the log")
    return json.loads(record.read_text())


def finished(run: NnunetRun, budget: float, threads: int, fold: str) -> dict | None:
    """The record of a finished run of the same budget, threads, fold and seed, if any."""
    path = run.folder / "record.json"
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    same = (rec["budget_seconds"], rec["threads"], rec["fold"], rec["seed"])
    return rec if same == (budget, threads, fold, run.seed) else None


def score(run: NnunetRun, record: dict) -> dict:
    """medflow's evaluation of one nnU-Net run's predictions, as a row."""
    from medflow.metrics.summary import evaluate_folders

    ref = run.data / "labelsTs"
    summary = evaluate_folders(run.folder / "pred", ref, run.folder / "eval", force=True)
    row = {
        "arm": f"{run.dataset}_nnunet",
        "dataset": run.dataset,
        "mode": METHODS["nnunet"],
        "seed": run.seed,
        "train_steps": record["train_steps"],
        "train_seconds": record["train_seconds"],
        "predict_seconds": record["predict_seconds"],
        "foreground": summary["foreground_mean"],
        "per_class": summary["mean"],
        "shape": "x".join(map(str, record["patch"])),
        "batch": record["batch"],
        "nnunet": record,
        "run": str(run.folder.relative_to(run.work)),
    }
    if run.dataset == "mni152-lesions":
        row["lesions"] = lesion_scores(run.folder / "pred", ref)
    return row


def nnunet_rows(args: argparse.Namespace) -> list[dict]:
    """Every nnU-Net run (``args.jobs`` side by side), scored."""
    budget = seconds(args.budget)
    for dataset in args.datasets:
        preprocess(args.nnunet_python, args.work, dataset, args.threads, args.reuse)
    runs = [NnunetRun(d, s, args.work) for d in args.datasets for s in args.seeds]

    def one(run: NnunetRun) -> dict:
        rec = finished(run, budget, args.threads, args.fold) if args.reuse else None
        if rec is None:
            t0 = time.perf_counter()
            rec = train_nnunet(args.nnunet_python, run, budget, args.threads, args.fold)
            print(
                f"nnU-Net {run.dataset} seed {run.seed}: {rec['train_steps']} iterations "
                f"in {rec['train_seconds']:.0f} s ({time.perf_counter() - t0:.0f} s in all)",
                flush=True,
            )
        return rec

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(one, runs))
    return [score(run, rec) for run, rec in zip(runs, records, strict=True)]


def medflow_rows(args: argparse.Namespace, modes: list[str]) -> list[dict]:
    """planned.py's arms of the modes asked for, trained with ``args.threads`` threads."""
    from medflow.engine.checkpoint import load_checkpoint
    from medflow.segmentation.protocol import run_protocol

    out = args.work / "medflow"
    # the steps (300) count only with budget "none", which this benchmark does not take
    arms = build_arms(args.work, args.datasets, 300, args.budget)
    arms = [
        type(a)(
            a.name,
            a.data,
            {**a.train, "threads": args.threads, "budget_clock": "cpu"},
            tags=a.tags,
        )
        for a in arms
        if a.tags["mode"] in modes
    ]
    rows = run_protocol(arms, args.seeds, out, reuse=args.reuse, jobs=args.jobs)
    for r in rows:
        cfg = load_checkpoint(out / r["checkpoint"])["config"]
        r["shape"] = "x".join(map(str, cfg["patch"] or [cfg["size"]] * 2))
        r["batch"] = cfg["batch_size"]
        r["mode"] = METHODS[r["mode"]]
        if r["dataset"] == "mni152-lesions":
            ref = args.work / "data" / r["dataset"] / "labelsTs"
            r["lesions"] = lesion_scores(out / r["run"] / "pred_default", ref)
    return rows


def build_data(work: Path, datasets: list[str]) -> None:
    from medflow.data.builtin import build

    for name in datasets:
        if not (work / "data" / name / "dataset.json").is_file():
            build(name, work / "data" / name, force=True)


def header(nnunet: list[dict], args: argparse.Namespace) -> str:
    from medflow.engine.runtime import machine_info

    m = machine_info()
    version = nnunet[0]["nnunet"]["nnunetv2"] if nnunet else "not run"
    cases = "medflow's training cases" if args.fold == "0" else "every training case"
    return (
        f"Budget {args.budget} per run, {args.threads} thread(s), {args.jobs} run(s) side by "
        f"side; nnunetv2 {version} 2d on {cases} (fold {args.fold}); {m['cpu']}, "
        f"{m['cores']} cores, torch {m['torch']}.\n\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nnunet-python", type=Path, default=Path("/work/nnunet-venv/bin/python"))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--datasets", nargs="+", default=list(DATASET_IDS), choices=list(DATASET_IDS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", default="4m", help="training time per run (4m, 45s)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--fold",
        default="0",
        choices=["0", "all"],
        help="0: medflow's training/validation cases (default); all: every case",
    )
    ap.add_argument("--threads", type=int, default=1, help="threads per run")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--reuse", action="store_true")
    args = ap.parse_args()
    if "nnunet" in args.methods and not args.nnunet_python.is_file():
        print(f"{args.nnunet_python}: no such Python; give --nnunet-python", file=sys.stderr)
        return 2

    import torch

    from medflow.segmentation.protocol import results_record

    torch.set_num_threads(args.threads)
    args.work = args.work.resolve()
    build_data(args.work, args.datasets)
    nnunet = nnunet_rows(args) if "nnunet" in args.methods else []
    modes = [m for m in ("fixed", "planned") if m in args.methods]
    rows = nnunet + (medflow_rows(args, modes) if modes else [])
    order = {label: i for i, label in enumerate(METHODS.values())}
    rows.sort(key=lambda r: (args.datasets.index(r["dataset"]), order[r["mode"]], r["seed"]))
    text = header(nnunet, args) + table(rows)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config["command"] = " ".join(sys.argv)
    version = nnunet[0]["nnunet"]["nnunetv2"] if nnunet else None
    record = results_record(rows, config, table=text, nnunetv2=version)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    args.results.with_suffix(".md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
