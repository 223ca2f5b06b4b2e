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

from medflow.data.datasets import load_slices, plan_preprocessing
from medflow.data.layout import load_dataset
from medflow.errors import DataError, OutputExistsError
from medflow.metrics.distribution import frechet_distance, mmd2
from medflow.metrics.overlap import dice_per_class, dice_rows
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.predict import Predictor, SamplingOptions
from medflow.segmentation.protocol import Arm, results_record, run_protocol, write_results
from medflow.synthesis.align import align
from medflow.synthesis.config import AlignConfig, SynthConfig
from medflow.synthesis.reward import FeatureEncoder, feature_scale
from medflow.synthesis.sample import PREFIX, sample_dataset
from medflow.synthesis.train import train_synth

EVAL_ENCODER_SEED = 1  # the reward's encoder has seed 0 by default
ORACLE = "target labelled (oracle)"


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


@dataclass(frozen=True)
class Condition:
    """One training set of the downstream segmenter.

    Attributes:
        name: its row in the table (``"source+aligned K=5"``).
        data: the dataset folder.
        synthetic: the name of the synthetic set it adds to the source (``"aligned K=5"``),
            whose images are graded for distance, faithfulness and mask statistics; None for
            a set of real cases only.
    """

    name: str
    data: Path
    synthetic: str | None = None


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
    conditions, alignment = _conditions(source, target, out, cfg, synth_model, device, reuse, say)
    arms = [
        Arm(c.name, c.data, cfg.segmenter, test=target, tags={"condition": c.name})
        for c in conditions
    ]
    rows = run_protocol(
        arms, cfg.seeds, out, device=device, reuse=reuse, say=lambda m: say(f"segmenter on {m}")
    )
    checkpoints = {(r["condition"], r["seed"]): out / r["checkpoint"] for r in rows}
    record = results_record(
        rows,
        dataclasses.asdict(cfg),
        device,
        synth_model=str(synth_model),
        seconds=time.perf_counter() - t_start,
        summary=summarise(rows),
        **_grade_synthetic(source, target, cfg, conditions, checkpoints, device),
        alignment={
            str(k): {
                key: a[key]
                for key in ("reward_before", "reward_after", "reference_slices", "seconds")
            }
            for k, a in alignment.items()
        },
    )
    write_results(out, record, markdown(record))
    return record


def _conditions(source, target, out, cfg, synth_model, device, reuse, say):
    """The segmenter's training sets: the source; source + unaligned pairs; source + pairs
    aligned to K references for every K (stage 2, run here); and the oracle. Returns them
    and each alignment's record."""
    conditions = [Condition("source", source)]
    say("sampling unaligned pairs")
    unaligned = out / "datasets" / "unaligned"
    _sample(synth_model, unaligned, cfg, source, device, reuse)
    conditions.append(Condition("source+unaligned", unaligned, "unaligned"))
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
        data = out / "datasets" / f"aligned_k{k}"
        _sample(aligned, data, cfg, source, device, reuse)
        conditions.append(Condition(f"source+aligned K={k}", data, f"aligned K={k}"))
    if cfg.oracle:
        conditions.append(Condition(ORACLE, target))
    return conditions, alignment


def _grade_synthetic(source, target, cfg, conditions, checkpoints, device) -> dict:
    """Distances of every synthetic set (and the real source) to the target test images,
    faithfulness of the synthetic images to their masks, and mask statistics."""
    spec = load_dataset(source)
    k_classes, channels = spec.num_classes, len(spec.channel_names)
    seg = TrainConfig(**cfg.segmenter)
    prep = plan_preprocessing(spec, spec.training, (seg.size, seg.size), seg.slice_axis)
    target_test = load_slices(load_dataset(target).test, prep, k_classes)
    synthetic = {
        c.synthetic: _synthetic_slices(c.data, prep, k_classes) for c in conditions if c.synthetic
    }
    source_real = load_slices(spec.training, prep, k_classes)
    first = cfg.seeds[0]
    judges = {"source_segmenter": checkpoints["source", first]}
    if cfg.oracle:
        judges["oracle_segmenter"] = checkpoints[ORACLE, first]
    images = {"source real": source_real.images, **{n: s.images for n, s in synthetic.items()}}
    masks = {"source real": source_real.masks, **{n: s.masks for n, s in synthetic.items()}}
    return {
        "distances_to_target_test": _distances(images, target_test.images, channels),
        "faithfulness_dice": {
            name: {j: _faithfulness(ckpt, s, k_classes, device) for j, ckpt in judges.items()}
            for name, s in synthetic.items()
        },
        "faithfulness_reference": {
            "source_segmenter_on_target_test": _faithfulness(
                judges["source_segmenter"], target_test, k_classes, device
            ),
        },
        "mask_statistics": {name: mask_statistics(m, k_classes) for name, m in masks.items()},
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per condition, and the gain over source-only."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["condition"], []).append(r)
    out = []
    for name, rs in by.items():
        entry = {"condition": name, "seeds": len(rs)}
        for metric in ("dice", "iou"):
            values = [100.0 * r["foreground"][metric] for r in rs]
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
