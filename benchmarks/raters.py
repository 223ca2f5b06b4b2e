"""Rater benchmark: do medflow's posterior samples match a known label distribution?

``mni152-raters`` gives every case R simulated raters whose per-voxel label frequency is
the MNI152 tissue probability map exactly (docs/DATA.md). Every arm trains on it with the
same budget (one rater drawn per row), predicts the test slabs, and is scored per axial
slice against the R raters: GED² (d = 1 - IoU), sample diversity, Hungarian-matched IoU, and
calibration of its fused probabilities against the true map. The floor is the GED of fresh
raters against the raters: what a perfect model would score with the same S.

    .venv/bin/python benchmarks/raters.py --out benchmarks/results/raters

runs both correlation lengths (2 mm and 8 mm) and writes ``raters.json``, ``raters.md`` and
``raters_samples_{2,8}mm.png`` into ``--out`` (run folders and datasets under ``--work``);
``--seeds 0 1 2`` repeats every arm over training seeds and the tables show the spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medflow.data import builtin
from medflow.data.io import read_image, read_label
from medflow.data.layout import load_dataset
from medflow.data.raters import simulate_raters
from medflow.engine.runtime import machine_info
from medflow.metrics.ambiguity import (
    brier,
    distance_matrix,
    diversity_from_distances,
    ged_from_distances,
    ged_unbiased_from_distances,
    matched_iou_from_distances,
    prob_mae,
    soft_ece,
    soft_region,
)
from medflow.metrics.overlap import confusion, dice
from medflow.segmentation.predict import Predictor, SamplingOptions
from medflow.segmentation.protocol import Arm as ProtocolArm
from medflow.segmentation.protocol import run_arm, run_dir

SAMPLES = (1, 4, 16)


@dataclass(frozen=True)
class Model:
    """One kind of trained network; ``members`` copies with seeds ``seed .. seed+members-1``."""

    name: str
    overrides: dict = field(default_factory=dict)
    members: int = 1


@dataclass(frozen=True)
class Arm:
    """How an arm draws its S samples from a model.

    Attributes:
        label: the table's row name.
        model: a :class:`Model` name.
        sampler: ``SamplingOptions.sampler`` ("auto": the model's posterior default).
        steps: sampler steps (None: the default).
        draw: ``"samples"`` (the sampler's draws), ``"pixel"`` (independent per-voxel draws
            from the soft mask: a UNet's softmax) or ``"members"`` (one sample per ensemble
            member, cycled).
        evals: network evaluations per sample, for the table.
    """

    label: str
    model: str
    sampler: str = "auto"
    steps: int | None = None
    draw: str = "samples"
    evals: int = 1


MODELS = [
    Model("medflow"),
    Model("unet", {"model": "unet"}, members=5),
    Model("unet-dropout", {"model": "unet", "dropout": 0.2}),
    Model("diffusion", {"model": "diffusion"}),
]
ARMS = [
    Arm("medflow shortcut, 1 eval/sample", "medflow"),
    *[Arm(f"medflow ODE euler-{n}", "medflow", "euler", n, evals=n) for n in (1, 2, 4, 8)],
    Arm("UNet, pixel-wise softmax sampling", "unet", draw="pixel"),
    Arm("UNet, MC dropout", "unet-dropout"),
    Arm("5-UNet deep ensemble", "unet", draw="members"),
    Arm("diffusion DDIM-10", "diffusion", "ddim", 10, evals=10),
]


@dataclass(frozen=True)
class Setup:
    correlation_mm: float
    raters: int = 8
    size: int = 64
    steps: int = 300
    batch_size: int = 16
    seed: int = 0
    threads: int = 2


# ----------------------------------------------------------------------------- training


def train_models(data: Path, runs: Path, setup: Setup, models: list[Model], reuse: bool) -> dict:
    """Train every model (each ensemble member its own run) through the one runner, as
    train-only arms; returns name -> checkpoints and training seconds."""
    trained = {}
    for model in models:
        fields = {
            "size": setup.size,
            "steps": setup.steps,
            "batch_size": setup.batch_size,
            "threads": setup.threads,
            **model.overrides,
        }
        arm = ProtocolArm(model.name, data, fields, settings=())
        # ensemble members of seed s: seeds 100 s .. 100 s + members - 1
        rows = [
            r
            for m in range(model.members)
            for r in run_arm(arm, 100 * setup.seed + m, runs, reuse=reuse)
        ]
        trained[model.name] = {
            "checkpoints": [runs / r["checkpoint"] for r in rows],
            "train_seconds": [r["train_seconds"] for r in rows],
        }
    return trained


# ----------------------------------------------------------------------------- sampling


def draw_samples(arm: Arm, predictors: list[Predictor], volume, n: int, seed: int) -> tuple:
    """``n`` sample label maps ``(n, X, Y, Z)`` and the fused soft mask ``(K, X, Y, Z)``."""
    if arm.draw == "members":
        preds = [
            p.predict_uncertain(volume, SamplingOptions(), keep_samples=True) for p in predictors
        ]
        labels = np.stack([preds[j % len(preds)].labels for j in range(n)])
        soft = np.mean([p.probabilities for p in preds], axis=0)
        return labels, np.moveaxis(soft, -1, 0)
    options = SamplingOptions(sampler=arm.sampler, steps=arm.steps, samples=n, seed=seed)
    pred = predictors[0].predict_uncertain(volume, options, keep_samples=True)
    soft = np.moveaxis(pred.probabilities, -1, 0)
    if arm.draw == "pixel":
        rng = np.random.default_rng(seed)
        cum = np.cumsum(soft, axis=0)
        u = rng.random((n, *soft.shape[1:]))
        labels = (u[:, None] > cum[None, :-1]).sum(1).astype(np.int16)
        return labels, soft
    return pred.sample_labels, soft


# ----------------------------------------------------------------------------- scoring


def score_slices(samples: np.ndarray, refs: np.ndarray, fresh: np.ndarray, axis: int, classes):
    """Per-slice GED (model and floor) for every S, diversity and matched IoU, averaged
    over the slices of one case that hold any tissue in any rater."""
    rows = {f"ged_S{s}": [] for s in SAMPLES}
    rows.update({f"floor_S{s}": [] for s in SAMPLES})
    # the unbiased (U-statistic, i != j) GED for S > 1: the V-statistic's E d(S, S') counts
    # the S zero self-distances, so at small S it rewards samples that all sit at the mean
    rows.update({f"ged_u_S{s}": [] for s in SAMPLES if s > 1})
    rows.update({f"floor_u_S{s}": [] for s in SAMPLES if s > 1})
    rows.update(diversity=[], matched_iou=[], ref_diversity=[], sample_iou=[])
    rows.update(local_ged=[], local_floor=[], area_spread=[])
    for z in range(refs.shape[1 + axis]):
        ref = np.take(refs, z, axis=1 + axis)
        if not ref.any():
            continue
        smp, frs = np.take(samples, z, axis=1 + axis), np.take(fresh, z, axis=1 + axis)
        d_yy = distance_matrix(ref, ref, classes)
        d_sy, d_ss = distance_matrix(smp, ref, classes), distance_matrix(smp, smp, classes)
        d_fy, d_ff = distance_matrix(frs, ref, classes), distance_matrix(frs, frs, classes)
        for s in SAMPLES:
            rows[f"ged_S{s}"].append(ged_from_distances(d_sy[:s], d_ss[:s, :s], d_yy).ged2)
            rows[f"floor_S{s}"].append(ged_from_distances(d_fy[:s], d_ff[:s, :s], d_yy).ged2)
            if s > 1:
                rows[f"ged_u_S{s}"].append(
                    ged_unbiased_from_distances(d_sy[:s], d_ss[:s, :s], d_yy)
                )
                rows[f"floor_u_S{s}"].append(
                    ged_unbiased_from_distances(d_fy[:s], d_ff[:s, :s], d_yy)
                )
        rows["diversity"].append(diversity_from_distances(d_ss))
        rows["ref_diversity"].append(diversity_from_distances(d_yy))
        rows["matched_iou"].append(matched_iou_from_distances(d_sy))
        rows["sample_iou"].append(1.0 - float(d_sy.mean()))  # a sample's IoU with a rater
        rows["local_ged"].append(local_ged(smp, ref, classes))
        rows["local_floor"].append(local_ged(frs, ref, classes))
        rows["area_spread"].extend(area_spread(smp, ref, classes))
    return {k: float(np.mean(v)) for k, v in rows.items()}


TILE = 16  # pixels (mm on the 1 mm template) of a tile of the local GED


def local_ged(samples: np.ndarray, refs: np.ndarray, classes) -> float:
    """Mean GED² (S = 16, V-statistic) over ``TILE`` x ``TILE`` tiles of a slice that hold
    tissue in some rater. Over a whole slice d = 1 - IoU averages over many independent
    patches, so its mean depends on per-pixel marginals alone and pixel-independent
    sampling scores as well as coherent sampling; inside a tile no larger than a few
    correlation lengths, coherence decides the distances."""
    scores = []
    h, w = refs.shape[1:]
    for y in range(0, h - TILE + 1, TILE):
        for x in range(0, w - TILE + 1, TILE):
            r = refs[:, y : y + TILE, x : x + TILE]
            if not r.any():
                continue
            sm = samples[:, y : y + TILE, x : x + TILE]
            d = [distance_matrix(a, b, classes) for a, b in ((sm, r), (sm, sm), (r, r))]
            scores.append(ged_from_distances(*d).ged2)
    return float(np.mean(scores)) if scores else 0.0


def area_spread(samples: np.ndarray, refs: np.ndarray, classes) -> list[float]:
    """Per class, the standard deviation of the class's area across samples over that
    across raters (1: the samples vary in size as raters do; pixel-independent sampling
    gives nearly constant areas, near 0). Classes whose raters agree on the area are
    skipped."""
    out = []
    for c in classes:
        sd_ref = (refs == c).sum((1, 2)).std(ddof=1)
        if sd_ref > 0:
            out.append(float((samples == c).sum((1, 2)).std(ddof=1) / sd_ref))
    return out


def score_case(samples, soft, refs, fresh, truth, axis, classes) -> dict:
    region = soft_region(truth)
    row = score_slices(samples, refs, fresh, axis, classes)
    row.update(
        ece=soft_ece(soft, truth, region),
        brier=brier(soft, truth, region),
        prob_mae=prob_mae(soft, truth, region),
        dice_mean_vs_raters=_dice_vs_raters(soft.argmax(0), refs, classes),
    )
    return row


def _dice_vs_raters(labels: np.ndarray, refs: np.ndarray, classes) -> float:
    """Mean over raters and classes of the fused mask's Dice (1 where both are empty)."""
    return float(np.mean([dice(*confusion(labels, ref, c)) for ref in refs for c in classes]))


# ----------------------------------------------------------------------------- the protocol


def test_cases(data: Path, setup: Setup, seed: int) -> list[dict]:
    """Every test case's image, R raters, true map and fresh raters."""
    spec = load_dataset(data)
    cases = []
    for case in spec.test:
        probs = read_image([data / "probabilitiesTs" / f"{case.case_id}.nii.gz"])
        truth = np.asarray(probs.array, dtype=np.float64)
        truth = truth / truth.sum(0, keepdims=True)
        refs = np.stack([read_label(p).array for p in case.raters])
        fresh = simulate_raters(
            truth, max(SAMPLES), setup.correlation_mm, probs.geometry.spacing,
            np.random.default_rng(10_000 + seed),
        )  # fmt: skip
        cases.append(
            {"id": case.case_id, "image": read_image(case.images), "refs": refs,
             "fresh": fresh, "truth": truth}
        )  # fmt: skip
    return cases


def run_root(work: Path, setup: Setup) -> Path:
    """Run folders of one correlation length and seed (seed 0 without a suffix)."""
    suffix = "" if setup.seed == 0 else f"-seed{setup.seed}"
    return work / f"runs-{setup.correlation_mm:g}mm{suffix}"


def run_setup(setup: Setup, work: Path, reuse: bool, arms: list[Arm]) -> dict:
    data = work / f"mni152-raters-{setup.correlation_mm:g}mm"
    if not (reuse and (data / "dataset.json").exists()):
        builtin.build(
            "mni152-raters", data, force=True, raters=setup.raters,
            correlation_mm=setup.correlation_mm,
        )  # fmt: skip
    needed = {a.model for a in arms}
    models = [m for m in MODELS if m.name in needed]
    trained = train_models(data, run_root(work, setup), setup, models, reuse)
    cases = test_cases(data, setup, setup.seed)
    spec = load_dataset(data)
    classes = [v for v in spec.labels.values() if v]
    results = {"setup": dataclasses.asdict(setup), "models": {}, "arms": []}
    for name, t in trained.items():
        results["models"][name] = {"train_seconds": t["train_seconds"]}
    floor_done = False
    for arm in arms:
        predictors = [Predictor(c, "cpu") for c in trained[arm.model]["checkpoints"]]
        t0 = time.perf_counter()
        per_case = []
        for case in cases:
            samples, soft = draw_samples(arm, predictors, case["image"], max(SAMPLES), 0)
            axis = predictors[0].prep.slice_axis
            row = score_case(
                samples, soft, case["refs"], case["fresh"], case["truth"], axis, classes
            )
            per_case.append({"case": case["id"], **row})
        mean = {k: float(np.mean([r[k] for r in per_case])) for k in per_case[0] if k != "case"}
        results["arms"].append(
            {**dataclasses.asdict(arm), "mean": mean, "per_case": per_case,
             "seconds": time.perf_counter() - t0}
        )  # fmt: skip
        if not floor_done:
            results["floor"] = {f"S{s}": mean[f"floor_S{s}"] for s in SAMPLES}
            results["floor"].update({f"u_S{s}": mean[f"floor_u_S{s}"] for s in SAMPLES if s > 1})
            results["floor"]["local"] = mean["local_floor"]
            results["ref_diversity"] = mean["ref_diversity"]
            floor_done = True
        print(f"  {arm.label}: GED S16 {mean['ged_S16']:.4f} div {mean['diversity']:.3f} "
              f"ECE {mean['ece']:.4f}", flush=True)  # fmt: skip
    return results


def _cell(values: list[float], digits: int) -> str:
    """Mean over seeds, with the range [min, max] when there are several."""
    mean = f"{np.mean(values):.{digits}f}"
    if len(values) < 2:
        return mean
    return f"{mean} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


COLUMNS = [
    ("GED² S=1", "ged_S1", 4),
    ("S=4", "ged_S4", 4),
    ("S=16", "ged_S16", 4),
    ("unbiased GED² S=16", "ged_u_S16", 4),
    ("diversity", "diversity", 3),
    ("matched IoU", "matched_iou", 3),
    ("sample IoU", "sample_iou", 3),
    ("local GED² (16 mm tiles)", "local_ged", 4),
    ("area spread (1 = raters')", "area_spread", 2),
    ("ECE", "ece", 4),
    ("Brier", "brier", 4),
    ("MAE to map", "prob_mae", 4),
    ("Dice (fused vs raters)", "dice_mean_vs_raters", 4),
]


def table(results: list[dict]) -> str:
    """One table per correlation length; cells are means over seeds [min, max]."""
    lines = []
    for corr in dict.fromkeys(r["setup"]["correlation_mm"] for r in results):
        runs = [r for r in results if r["setup"]["correlation_mm"] == corr]
        seeds = [r["setup"]["seed"] for r in runs]

        def floor(key: str, runs=runs) -> str:
            return _cell([r["floor"][key] for r in runs], 4)

        lines += [
            f"\n### Correlation length {corr:g} mm (seeds {', '.join(map(str, seeds))})\n",
            f"Floor (fresh raters against raters): GED² S=1 {floor('S1')}, S=4 {floor('S4')}, "
            f"S=16 {floor('S16')}; unbiased S=16 {floor('u_S16')} (0 in expectation); local "
            f"{floor('local')}; rater "
            f"diversity {_cell([r['ref_diversity'] for r in runs], 3)}\n",
            "| arm | evals/sample | " + " | ".join(c[0] for c in COLUMNS) + " |",
            "|---|---|" + "---|" * len(COLUMNS),
        ]
        for i, arm in enumerate(runs[0]["arms"]):
            means = [r["arms"][i]["mean"] for r in runs]
            cells = [_cell([m[key] for m in means], digits) for _, key, digits in COLUMNS]
            lines.append(f"| {arm['label']} | {arm['evals']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(work: Path, setup: Setup, out_png: Path, n: int = 4) -> None:
    """Raters next to medflow's one-evaluation samples on the middle slice of a test case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = work / f"mni152-raters-{setup.correlation_mm:g}mm"
    case = test_cases(data, setup, setup.seed)[1]
    run = run_dir(run_root(work, setup), ProtocolArm("medflow", data), 100 * setup.seed)
    pred = Predictor(run / "checkpoint_final.pt", "cpu")
    samples, _ = draw_samples(ARMS[0], [pred], case["image"], n, 0)
    axis = pred.prep.slice_axis
    z = case["refs"].shape[1 + axis] // 2
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6))
    for j in range(n):
        for row, (maps, name) in enumerate(((case["refs"], "rater"), (samples, "sample"))):
            ax = axes[row, j]
            ax.imshow(np.take(maps[j], z, axis=axis).T, cmap="viridis", vmin=0, vmax=2,
                      origin="lower", interpolation="nearest")  # fmt: skip
            ax.set_title(f"{name} {j}", fontsize=9)
            ax.axis("off")
    fig.suptitle(f"{case['id']}, correlation {setup.correlation_mm:g} mm: raters (top), "
                 "medflow one-evaluation samples (bottom)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/raters"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/medflow_raters"))
    ap.add_argument("--correlation-mm", type=float, nargs="+", default=[2.0, 8.0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", nargs="+", default=None, help="keep the arms of these models")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs and datasets")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    arms = ARMS if args.arms is None else [a for a in ARMS if a.model in args.arms]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for corr in args.correlation_mm:
            setup = Setup(
                correlation_mm=corr, steps=args.steps, size=args.size, threads=args.threads,
                seed=seed,
            )  # fmt: skip
            print(f"correlation {corr:g} mm, seed {seed}", flush=True)
            results.append(run_setup(setup, args.work, args.reuse, arms))
            record = {"command": "python benchmarks/raters.py " + " ".join(argv or sys.argv[1:])}
            record.update(machine=machine_info(), results=results)
            (args.out / "raters.json").write_text(json.dumps(record, indent=2) + "\n")
            (args.out / "raters.md").write_text(table(results))
            if seed == args.seeds[0]:
                figure(args.work, setup, args.out / f"raters_samples_{corr:g}mm.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
