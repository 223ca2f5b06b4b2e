"""The AlignFlow downstream harness: what aligned synthetic pairs buy a segmenter at a new site.

One call runs the whole protocol on a labelled source dataset and a target-site dataset
(``imagesTs``/``labelsTs`` for evaluation only, ``references/`` of unlabelled images):

1. stage 1 on the source (or a given stage-1 checkpoint);
2. ``n_synthetic`` pairs from the stage-1 model ("unaligned"), and for every K the stage-2
   model aligned to the first K references ("aligned K"), each joined to the source's real
   cases;
3. the same segmenter trained, for every seed, on: source only, source + unaligned,
   source + aligned K for every K, and (``oracle``) the target's own labelled training cases,
   the upper bound a labelled target would give;
4. each evaluated on the target test set at native resolution: mDice and mIoU (mean over
   foreground classes), then mean and standard deviation over seeds;
5. distribution distances between each synthetic set (and the real source) and the target
   test images: MMD^2 and Fréchet distance in the features of a frozen random encoder with a
   different seed from the reward's, so the alignment is not graded by the features it
   optimised;
6. faithfulness: the source-only and the oracle segmenters applied to each synthetic set,
   Dice against the masks that conditioned the images.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medflow import __version__
from medflow.data.datasets import load_slices, plan_preprocessing
from medflow.data.io import atomic_write
from medflow.data.layout import load_dataset
from medflow.engine.logs import read_log
from medflow.engine.runtime import machine_info
from medflow.errors import DataError, OutputExistsError
from medflow.metrics.distribution import frechet_distance, mmd2
from medflow.metrics.overlap import dice_per_class, dice_rows
from medflow.metrics.summary import evaluate_folders
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.predict import Predictor, SamplingOptions, predict_folder
from medflow.segmentation.train import train
from medflow.synthesis.align import align
from medflow.synthesis.config import AlignConfig, SynthConfig
from medflow.synthesis.reward import FeatureEncoder, feature_scale
from medflow.synthesis.sample import PREFIX, sample_dataset
from medflow.synthesis.train import train_synth

EVAL_ENCODER_SEED = 1  # the reward's encoder has seed 0 by default


@dataclass(frozen=True)
class HarnessConfig:
    """What the harness runs.

    Attributes:
        ks: numbers of reference images to align with.
        seeds: segmenter seeds per condition.
        n_synthetic: synthetic pairs added to the source's real cases.
        oracle: also train on the target's labelled training cases (upper bound).
        segmenter: ``TrainConfig`` fields of the downstream segmenter.
        synth: ``SynthConfig`` fields of stage 1.
        align: ``AlignConfig`` fields of stage 2 (``k`` is set per run).
    """

    ks: tuple[int, ...] = (1, 5, 10)
    seeds: tuple[int, ...] = (0, 1, 2)
    n_synthetic: int = 96
    oracle: bool = True
    segmenter: dict = field(default_factory=lambda: {"size": 64, "steps": 200, "val_fraction": 0})
    synth: dict = field(default_factory=dict)
    align: dict = field(default_factory=dict)


def _sample(model: Path, out: Path, cfg: HarnessConfig, source: Path, device: str, reuse: bool):
    if reuse and (out / "dataset.json").exists():
        return
    sample_dataset(
        model, out, cfg.n_synthetic, include_source=source, device=device, force=True, quiet=True
    )


def _check_target(target: Path) -> None:
    for sub in ("imagesTs", "labelsTs", "references"):
        if not (target / sub).is_dir():
            raise DataError(target, f"target dataset lacks {sub}/ (see docs/ALIGNFLOW.md)")


def _synthetic_slices(dataset: Path, prep, k: int):
    spec = load_dataset(dataset)
    cases = [c for c in spec.training if c.case_id.startswith(PREFIX + "_")]
    return load_slices(cases, prep, k)


def _distances(sets: dict[str, torch.Tensor], target: torch.Tensor, channels: int) -> dict:
    encoder = FeatureEncoder(channels, seed=EVAL_ENCODER_SEED)
    with torch.no_grad():
        ref = encoder(target)
        # one scale for every set: the target test features' spread, floored and group-
        # weighted as the reward's is (constant features are not amplified)
        scale = feature_scale(ref, encoder.groups)
        out = {}
        for name, images in sets.items():
            feats = encoder(images)
            out[name] = {
                "mmd2": float(mmd2(feats / scale, ref / scale)),
                "frechet": frechet_distance(feats / scale, ref / scale),
            }
    return out


def mask_statistics(masks: torch.Tensor, num_classes: int, pairs: int = 200) -> dict:
    """Diversity and size of label maps ``(N, H, W)``: per foreground class the mean and
    standard deviation of its area fraction, and the mean Dice between random pairs of
    different maps (1 = every map the same)."""
    gen = torch.Generator().manual_seed(0)
    n = masks.shape[0]
    i = torch.randint(n, (pairs,), generator=gen)
    j = (i + 1 + torch.randint(n - 1, (pairs,), generator=gen)) % n
    out = {}
    for c in range(1, num_classes):
        fg = (masks == c).flatten(1).numpy()
        area = fg.mean(1)
        dice = dice_rows(fg[i.numpy()], fg[j.numpy()])
        out[str(c)] = {
            "area_mean": float(area.mean()),
            "area_std": float(area.std(ddof=1)),
            "pairwise_dice": float(dice.mean()),
        }
    return out


def _faithfulness(checkpoint: Path, slices, k: int, device: str) -> float:
    predictor = Predictor(checkpoint, device)
    probs = predictor.probs(slices.images, predictor.sampling(SamplingOptions()))
    dice = dice_per_class(probs.argmax(1), slices.masks.long(), k)
    return float(sum(dice) / len(dice))


def run_alignflow(
    source: str | Path,
    target: str | Path,
    out: str | Path,
    cfg: HarnessConfig,
    *,
    synth_model: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
    reuse: bool = False,
) -> dict:
    """Run the protocol of the module docstring into ``out``; returns ``results.json``.

    With ``reuse``, an alignment, a synthetic dataset or a segmenter run already complete in
    ``out`` (from an earlier, interrupted or partly invalidated call) is read back instead
    of computed again; delete what must be redone."""
    source, target, out = Path(source), Path(target), Path(out)
    if (out / "results.json").exists() and not force:
        raise OutputExistsError(out / "results.json")
    _check_target(target)
    spec = load_dataset(source)
    k_classes, channels = spec.num_classes, len(spec.channel_names)
    say = (lambda *a: None) if quiet else print
    t_start = time.perf_counter()

    if synth_model is None:
        say("stage 1: mask flow + image flow on the source")
        synth_model = train_synth(
            source,
            out / "synth" / "stage1",
            SynthConfig(**cfg.synth),
            device=device,
            force=True,
            quiet=True,
        )
    datasets = {"source": source}
    say("sampling unaligned pairs")
    datasets["source+unaligned"] = out / "datasets" / "unaligned"
    _sample(synth_model, datasets["source+unaligned"], cfg, source, device, reuse)
    alignment = {}
    for k in cfg.ks:
        aligned = out / "synth" / f"align_k{k}" / "synth.pt"
        if not (reuse and aligned.exists()):
            say(f"stage 2: aligning to K={k} reference(s)")
            aligned = align(
                synth_model,
                target / "references",
                aligned.parent,
                AlignConfig(**{**cfg.align, "k": k}),
                device=device,
                force=True,
                quiet=True,
            )
        alignment[k] = json.loads((aligned.parent / "align.json").read_text())
        name = f"source+aligned K={k}"
        datasets[name] = out / "datasets" / f"aligned_k{k}"
        _sample(aligned, datasets[name], cfg, source, device, reuse)
    if cfg.oracle:
        datasets["target labelled (oracle)"] = target

    rows = []
    checkpoints: dict[tuple[str, int], Path] = {}
    for name, data in datasets.items():
        for seed in cfg.seeds:
            tag = name.replace(" ", "_").replace("+", "_").replace("=", "").replace("(", "")
            run = out / "runs" / f"{tag.replace(')', '')}_seed{seed}"
            checkpoints[name, seed] = run / "checkpoint_final.pt"
            if reuse and (run / "eval" / "summary.json").exists():
                summary = json.loads((run / "eval" / "summary.json").read_text())
                seconds = read_log(run / "log.csv")[-1]["seconds"]
            else:
                say(f"segmenter on {name}, seed {seed}")
                tcfg = TrainConfig(**{**cfg.segmenter, "seed": seed})
                seconds = train(data, run, tcfg, device=device, force=True, quiet=True).seconds
                predict_folder(
                    checkpoints[name, seed],
                    target / "imagesTs",
                    run / "pred",
                    device=device,
                    force=True,
                    quiet=True,
                )
                summary = evaluate_folders(
                    run / "pred", target / "labelsTs", run / "eval", force=True
                )
            rows.append(
                {
                    "condition": name,
                    "seed": seed,
                    "dice": summary["foreground_mean"]["dice"],
                    "iou": summary["foreground_mean"]["iou"],
                    "per_class": summary["mean"],
                    "train_seconds": seconds,
                    "run": str(run.relative_to(out)),
                }
            )

    seg = TrainConfig(**cfg.segmenter)
    prep = plan_preprocessing(spec, spec.training, (seg.size, seg.size), seg.slice_axis)
    tspec = load_dataset(target)
    target_test = load_slices(tspec.test, prep, k_classes)
    synthetic = {
        name: _synthetic_slices(path, prep, k_classes)
        for name, path in datasets.items()
        if name.startswith("source+")
    }
    source_real = load_slices(spec.training, prep, k_classes)
    image_sets = {"source real": source_real.images}
    image_sets.update({name[len("source+") :]: s.images for name, s in synthetic.items()})
    distances = _distances(image_sets, target_test.images, channels)
    faithfulness = {
        name[len("source+") :]: {
            "source_segmenter": _faithfulness(
                checkpoints["source", cfg.seeds[0]], s, k_classes, device
            ),
            **(
                {
                    "oracle_segmenter": _faithfulness(
                        checkpoints["target labelled (oracle)", cfg.seeds[0]], s, k_classes, device
                    )
                }
                if cfg.oracle
                else {}
            ),
        }
        for name, s in synthetic.items()
    }
    masks = {"source real": source_real.masks}
    masks.update({name[len("source+") :]: s.masks for name, s in synthetic.items()})
    diversity = {name: mask_statistics(m, k_classes) for name, m in masks.items()}
    reference = {
        "source_segmenter_on_target_test": _faithfulness(
            checkpoints["source", cfg.seeds[0]], target_test, k_classes, device
        ),
    }
    record = {
        "medflow": __version__,
        "machine": {**machine_info(), "threads": torch.get_num_threads()},
        "config": dataclasses.asdict(cfg),
        "synth_model": str(synth_model),
        "seconds": time.perf_counter() - t_start,
        "rows": rows,
        "summary": summarise(rows),
        "distances_to_target_test": distances,
        "faithfulness_dice": faithfulness,
        "faithfulness_reference": reference,
        "mask_statistics": diversity,
        "alignment": {
            str(k): {
                key: a[key]
                for key in ("reward_before", "reward_after", "reference_slices", "seconds")
            }
            for k, a in alignment.items()
        },
    }
    atomic_write(out / "results.md", lambda p: p.write_text(markdown(record)))
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    return record


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per condition, and the gain over source-only."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["condition"], []).append(r)
    out = []
    for name, rs in by.items():
        entry = {"condition": name, "seeds": len(rs)}
        for metric in ("dice", "iou"):
            values = [100.0 * r[metric] for r in rs]
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{metric}_values"] = values
        out.append(entry)
    base = next((e for e in out if e["condition"] == "source"), None)
    for e in out:
        for metric in ("dice", "iou"):
            e[f"{metric}_gain"] = e[metric] - base[metric] if base else None
    return out


def markdown(record: dict) -> str:
    lines = [
        "| training data | mDice (%) | mIoU (%) | gain mDice | gain mIoU | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for e in record["summary"]:
        lines.append(
            f"| {e['condition']} | {e['dice']:.1f} ± {e['dice_std']:.1f} | "
            f"{e['iou']:.1f} ± {e['iou_std']:.1f} | {e['dice_gain']:+.1f} | "
            f"{e['iou_gain']:+.1f} | {e['seeds']} |"
        )
    lines += ["", "| images | MMD² to target test | Fréchet distance |", "|---|---|---|"]
    for name, d in record["distances_to_target_test"].items():
        lines.append(f"| {name} | {d['mmd2']:.4f} | {d['frechet']:.2f} |")
    lines += [
        "",
        "| synthetic set | Dice of source segmenter | Dice of oracle segmenter |",
        "|---|---|---|",
    ]
    for name, f in record["faithfulness_dice"].items():
        oracle = f.get("oracle_segmenter")
        lines.append(
            f"| {name} | {f['source_segmenter']:.3f} | "
            f"{'' if oracle is None else f'{oracle:.3f}'} |"
        )
    stats = record["mask_statistics"]
    classes = list(next(iter(stats.values())))
    lines += [
        "",
        "| masks | "
        + " | ".join(f"class {c} area (mean ± std) | class {c} pairwise Dice" for c in classes)
        + " |",
        "|---|" + "---|---|" * len(classes),
    ]
    for name, per in stats.items():
        cells = [
            f"{per[c]['area_mean']:.3f} ± {per[c]['area_std']:.3f} | {per[c]['pairwise_dice']:.3f}"
            for c in classes
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ref = record["faithfulness_reference"]["source_segmenter_on_target_test"]
    lines += ["", f"Source segmenter on the real target test slices (same measure): {ref:.3f}", ""]
    return "\n".join(lines)
