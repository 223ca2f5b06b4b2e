"""The AlignFlow downstream harness: what aligned synthetic pairs buy a segmenter at a new site.

One call runs the whole protocol on a labelled source dataset and a target-site dataset
(``imagesTs``/``labelsTs`` for evaluation only, ``references/`` of unlabelled images):

1. stage 1 on the source (or a given stage-1 checkpoint);
2. the training sets, one :class:`Condition` each (:func:`conditions`): the source alone;
   source + ``n_synthetic`` stage-1 ("unaligned") pairs; source + pairs of the stage-2 model
   aligned to the first K references, for every K; and the controls and baselines a
   reviewer asks for, each selectable (``HarnessConfig.baselines``): unaligned pairs drawn
   with the aligned model's sampler steps (``equal_steps``: alignment, not the sampler, is
   what differs), stage-1 images for the *real* source masks (``real_masks``: what the mask
   flow adds), the source under strong appearance augmentation (``augmented``) and the
   source histogram-matched to the K references (``histogram``); and (``oracle``) the
   target's own labelled training cases, the upper bound;
3. for every replicate seed ``r`` (``seeds``): every synthetic set drawn, every alignment
   run and every segmenter trained with seed ``r``, so conditions are compared paired,
   replicate by replicate (:mod:`medflow.synthesis.tables`: paired gains with t intervals);
4. each segmenter evaluated on the target test set at native resolution: mDice and mIoU
   (mean over foreground classes);
5. distribution distances between each synthetic set of the first replicate (and the real
   source) and the target test images: MMD^2 and Fréchet distance in the features of a
   frozen random encoder with a different seed from the reward's, so the alignment is not
   graded by the features it optimised;
6. faithfulness: the source-only and the oracle segmenters applied to each synthetic set,
   Dice against the masks that conditioned the images.

Every condition trains one more segmenter per seed: the baselines add ``3 + len(ks)``
arms to the core ``2 + len(ks)`` (+ oracle).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
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
from medflow.synthesis.align import align, read_references
from medflow.synthesis.baselines import augmented_dataset, histogram_matched_dataset
from medflow.synthesis.config import AlignConfig, SynthConfig
from medflow.synthesis.model import SynthModel
from medflow.synthesis.reward import FeatureEncoder, feature_scale
from medflow.synthesis.sample import PREFIX, sample_dataset
from medflow.synthesis.tables import markdown, paired_difference, summarise
from medflow.synthesis.train import train_synth

EVAL_ENCODER_SEED = 1  # the reward's encoder has seed 0 by default
ORACLE = "target labelled (oracle)"
BASELINES = ("equal_steps", "real_masks", "augmented", "histogram")


@dataclass(frozen=True)
class HarnessConfig:
    """What the harness runs.

    Attributes:
        ks: numbers of reference images to align with.
        seeds: replicate seeds: of the segmenter, the synthetic draws, the alignments and
            the augmentation (one replicate = one seed for all of them).
        n_synthetic: synthetic pairs added to the source's real cases.
        oracle: also train on the target's labelled training cases (upper bound).
        baselines: which of :data:`BASELINES` to run (module docstring).
        augment_copies: augmented copies of every source case in ``augmented``.
        segmenter: ``TrainConfig`` fields of the downstream segmenter.
        synth: ``SynthConfig`` fields of stage 1.
        align: ``AlignConfig`` fields of stage 2 (``k`` and ``seed`` are set per run).
    """

    ks: tuple[int, ...] = (1, 5, 10)
    seeds: tuple[int, ...] = (0, 1, 2)
    n_synthetic: int = 96
    oracle: bool = True
    baselines: tuple[str, ...] = BASELINES
    augment_copies: int = 1
    segmenter: dict = field(default_factory=lambda: {"size": 64, "steps": 200, "val_fraction": 0})
    synth: dict = field(default_factory=dict)
    align: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {BASELINES}")
        if not self.seeds or self.augment_copies < 1 or self.n_synthetic < 1:
            raise ValueError("need seeds, augment_copies >= 1 and n_synthetic >= 1")


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


@dataclass
class _Harness:
    """One harness run's inputs and what it has built so far (datasets, alignments)."""

    source: Path
    target: Path
    out: Path
    cfg: HarnessConfig
    stage1: Path
    device: str
    reuse: bool
    say: Callable[[str], None]
    built: dict = field(default_factory=dict)
    alignment: dict = field(default_factory=dict)  # K -> seed -> align.json

    def dataset(self, name: str, make: Callable[[Path], object]) -> Path:
        """``out/datasets/<name>``, made by ``make(path)`` once per run (read back with
        ``reuse`` when complete)."""
        path = self.out / "datasets" / name
        if name not in self.built:
            if not (self.reuse and (path / "dataset.json").exists()):
                self.say(f"building {name}")
                make(path)
            self.built[name] = path
        return path

    def sample(self, model: Path, path: Path, seed: int, **kwargs) -> None:
        sample_dataset(
            model,
            path,
            self.cfg.n_synthetic,
            seed=seed,
            include_source=self.source,
            device=self.device,
            force=True,
            quiet=True,
            **kwargs,
        )


def _source(h: _Harness, seed: int) -> Path:
    return h.source


def _target(h: _Harness, seed: int) -> Path:
    return h.target


def _unaligned(h: _Harness, seed: int, steps: int | None = None) -> Path:
    name = "unaligned" if steps is None else f"unaligned_{steps}steps"
    return h.dataset(f"{name}_seed{seed}", lambda p: h.sample(h.stage1, p, seed, steps=steps))


def _real_masks(h: _Harness, seed: int) -> Path:
    """Stage-1 images for ``n_synthetic`` real source masks (drawn without replacement while
    they last, at the stage-1 model's size)."""

    def make(path: Path) -> None:
        model = SynthModel.load(h.stage1)
        spec = load_dataset(h.source)
        masks = load_slices(spec.training, model.prep, spec.num_classes).masks
        gen = torch.Generator().manual_seed(seed)
        order = torch.cat(
            [
                torch.randperm(len(masks), generator=gen)
                for _ in range(-(-h.cfg.n_synthetic // len(masks)))
            ]
        )
        h.sample(h.stage1, path, seed, masks=masks[order[: h.cfg.n_synthetic]])

    return h.dataset(f"real_masks_seed{seed}", make)


def _augmented(h: _Harness, seed: int) -> Path:
    axis = SynthModel.load(h.stage1).prep.slice_axis
    copies = h.cfg.augment_copies
    return h.dataset(
        f"augmented_seed{seed}", lambda p: augmented_dataset(h.source, p, copies, axis, seed)
    )


def _histogram(h: _Harness, seed: int, k: int) -> Path:
    def make(path: Path) -> None:
        refs = read_references(h.target / "references", SynthModel.load(h.stage1).prep, k)
        histogram_matched_dataset(h.source, refs, path)

    return h.dataset(f"histmatch_k{k}", make)  # deterministic: one for every replicate


def _aligned(h: _Harness, seed: int, k: int) -> Path:
    aligned = h.out / "synth" / f"align_k{k}_seed{seed}" / "synth.pt"
    done = seed in h.alignment.get(k, {}) or (h.reuse and aligned.exists())
    if not done:
        h.say(f"stage 2: aligning to K={k} reference(s), seed {seed}")
        align(
            h.stage1,
            h.target / "references",
            aligned.parent,
            AlignConfig(**{**h.cfg.align, "k": k, "seed": seed}),
            device=h.device,
            force=True,
            quiet=True,
        )
    record = json.loads((aligned.parent / "align.json").read_text())
    h.alignment.setdefault(k, {})[seed] = record
    return h.dataset(f"aligned_k{k}_seed{seed}", lambda p: h.sample(aligned, p, seed))


@dataclass(frozen=True)
class Condition:
    """One training set of the downstream segmenter: one row of the table.

    Attributes:
        name: its row in the table (``"source+aligned K=5"``).
        build: ``build(harness, seed)`` -> the dataset folder of that replicate (built once).
        synthetic: the name of the synthetic set it adds to the source (``"aligned K=5"``),
            whose first replicate is graded for distance, faithfulness and mask statistics;
            None for a set of real cases only.
        baseline: the :data:`BASELINES` entry that selects it; None for the core arms.
    """

    name: str
    build: Callable[[_Harness, int], Path]
    synthetic: str | None = None
    baseline: str | None = None


def conditions(cfg: HarnessConfig, stage1_steps: int) -> list[Condition]:
    """The harness's arms, in table order: an arm is one entry here."""
    steps = AlignConfig(**cfg.align).sampler_steps
    arms = [
        Condition("source", _source),
        Condition("source+unaligned", _unaligned, "unaligned"),
        Condition(
            f"source+unaligned, {steps} steps",
            partial(_unaligned, steps=steps),
            f"unaligned, {steps} steps",
            "equal_steps",
        ),
        Condition(
            "source+stage-1 on real masks", _real_masks, "stage-1 on real masks", "real_masks"
        ),
        Condition("source+augmented", _augmented, baseline="augmented"),
        *(
            Condition(f"source hist-matched K={k}", partial(_histogram, k=k), None, "histogram")
            for k in cfg.ks
        ),
        *(
            Condition(f"source+aligned K={k}", partial(_aligned, k=k), f"aligned K={k}")
            for k in cfg.ks
        ),
    ]
    if cfg.oracle:
        arms.append(Condition(ORACLE, _target))
    if steps == stage1_steps:  # the equal-steps control would repeat source+unaligned
        arms = [c for c in arms if c.baseline != "equal_steps"]
    return [c for c in arms if c.baseline is None or c.baseline in cfg.baselines]


def contrasts(conds: list[Condition], rows: list[dict], ks) -> list[dict]:
    """Paired differences that answer the reviewer's questions: every aligned K against the
    unaligned sets (with the aligned sampler's steps first: same steps, only the alignment
    differs), against strong augmentation and against histogram matching to the same K."""
    names = {c.name for c in conds}
    out = []
    for k in ks:
        aligned = f"source+aligned K={k}"
        unaligned = [c.name for c in conds if c.name.startswith("source+unaligned")]
        others = [*reversed(unaligned), "source+augmented", f"source hist-matched K={k}"]
        out += [paired_difference(rows, aligned, b) for b in others if b in names]
    return out


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

    With ``reuse``, an alignment, a dataset or a segmenter run already complete in ``out``
    (from an earlier, interrupted or partly invalidated call) is read back instead of
    computed again; delete what must be redone."""
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
    h = _Harness(source, target, out, cfg, Path(synth_model), device, reuse, say)
    conds = conditions(cfg, SynthModel.load(synth_model).sample_steps)
    rows = []
    for seed in cfg.seeds:  # replicate by replicate: its datasets, then its segmenters
        arms = [
            Arm(c.name, c.build(h, seed), cfg.segmenter, test=target, tags={"condition": c.name})
            for c in conds
        ]
        rows += run_protocol(
            arms, (seed,), out, device=device, reuse=reuse, say=lambda m: say(f"segmenter on {m}")
        )
    for r in rows:
        r["seeds_evaluated"] = len(cfg.seeds)
    checkpoints = {(r["condition"], r["seed"]): out / r["checkpoint"] for r in rows}
    record = results_record(
        rows,
        dataclasses.asdict(cfg),
        device,
        synth_model=str(synth_model),
        seconds=time.perf_counter() - t_start,
        summary=summarise(rows),
        contrasts=contrasts(conds, rows, cfg.ks),
        **_grade_synthetic(h, conds, checkpoints),
        alignment={
            str(k): {
                str(seed): {
                    key: a[key]
                    for key in ("reward_before", "reward_after", "reference_slices", "seconds")
                }
                for seed, a in by_seed.items()
            }
            for k, by_seed in h.alignment.items()
        },
    )
    write_results(out, record, markdown(record))
    return record


def _grade_synthetic(h: _Harness, conds: list[Condition], checkpoints: dict) -> dict:
    """Distances of every synthetic set of the first replicate (and the real source) to the
    target test images, faithfulness of the synthetic images to their masks, and mask
    statistics."""
    cfg, device, first = h.cfg, h.device, h.cfg.seeds[0]
    spec = load_dataset(h.source)
    k_classes, channels = spec.num_classes, len(spec.channel_names)
    seg = TrainConfig(**cfg.segmenter)
    prep = plan_preprocessing(spec, spec.training, (seg.size, seg.size), seg.slice_axis)
    target_test = load_slices(load_dataset(h.target).test, prep, k_classes)
    synthetic = {
        c.synthetic: _synthetic_slices(c.build(h, first), prep, k_classes)
        for c in conds
        if c.synthetic
    }
    source_real = load_slices(spec.training, prep, k_classes)
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
