"""The AlignFlow downstream harness: what aligned synthetic pairs buy a segmenter at a new site.

One call runs the whole protocol on a labelled source dataset and a target-site dataset
(``imagesTs``/``labelsTs`` for evaluation only, ``references/`` of unlabelled images):

1. stage 1 on the source (or a given stage-1 checkpoint): one for every replicate, or
   with ``stage1_per_seed`` one per replicate seed, so that the paired intervals also hold
   what stage 1's own seed changes;
2. the training sets, one :class:`Condition` each (:func:`conditions`): the source alone;
   source + ``n_synthetic`` stage-1 ("unaligned") pairs; source + pairs of the stage-2 model
   aligned to the first K references, for every K; and the controls and baselines a
   reviewer asks for, each selectable (``HarnessConfig.baselines``): unaligned pairs drawn
   with the aligned model's sampler steps (``equal_steps``: alignment, not the sampler, is
   what differs), stage-1 images for the *real* source masks (``real_masks``: what the mask
   flow adds), the source under strong appearance augmentation (``augmented``) and the
   source histogram-matched to the K references (``histogram``); translation from real
   masks, outside :data:`DEFAULT_BASELINES`: source + pairs for real source masks of the
   model aligned on those masks (``translated``: against the stage-1-on-real-masks arm only
   the alignment differs) and of the model aligned to translate each mask's real image
   from ``sdedit_start`` (``translated_sdedit``); the aligned pairs under the same strong
   augmentation as the source's (``augmented_aligned``: source + aligned pairs, every case
   with its augmented copies; against ``augmented`` only the aligned pairs differ, so it
   asks whether alignment adds anything to augmentation); with a ``judge``, the same
   alignments without it (``unjudged``: judge weight 0, class anchors from the mixture;
   against the judged arm only the judge differs; with ``augmented_aligned`` also
   augmented); and (``oracle``) the target's own labelled training cases, the upper bound;
3. for every replicate seed ``r`` (``seeds``): every synthetic set drawn, every alignment
   run and every segmenter trained with seed ``r``, so conditions are compared paired,
   replicate by replicate (:mod:`medflow.synthesis.tables`: paired gains with t intervals);
   arm by arm in table order, each set built and its segmenter trained before the next,
   so that with ``judge`` the alignments can use an arm's segmenter of the same replicate
   (source, or source under augmentation): for the class anchors' labels of the
   references, or as the judge term's judge;
4. each segmenter evaluated on the target test set at native resolution: mDice and mIoU
   (mean over foreground classes);
5. distribution distances between each synthetic set of the first replicate (and the real
   source) and the target test images: MMD^2 and Fréchet distance in the features of a
   frozen random encoder with a different seed from the reward's, so the alignment is not
   graded by the features it optimised;
6. faithfulness: the source-only and the oracle segmenters applied to each synthetic set,
   Dice against the masks that conditioned the images; for every replicate, its sets by
   its own segmenters (the first replicate's also as before).

Every condition trains one more segmenter per seed: the default baselines add
``3 + len(ks)`` arms to the core ``2 + len(ks)`` (+ oracle); ``translated`` and
``translated_sdedit`` add ``len(ks)`` arms and ``len(ks)`` alignments per seed each,
``augmented_aligned`` ``len(ks)`` arms (it reuses the aligned arms' alignments),
``unjudged`` ``len(ks)`` alignments and ``len(ks)`` arms per seed (twice the arms with
``augmented_aligned``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
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
from medflow.synthesis.sample import PREFIX, real_pairs, sample_dataset
from medflow.synthesis.tables import markdown, paired_difference, summarise
from medflow.synthesis.train import train_synth

# what results.json keeps of every alignment's align.json
ALIGNMENT_FIELDS = (
    "reward_before",
    "reward_after",
    "reference_slices",
    "seconds",
    "class_means",
    "judge_before",
    "judge_after",
)
EVAL_ENCODER_SEED = 1  # the reward's encoder has seed 0 by default
ORACLE = "target labelled (oracle)"
# what runs unless baselines are chosen; the translation arms cost an alignment per K each
DEFAULT_BASELINES = ("equal_steps", "real_masks", "augmented", "histogram")
BASELINES = (
    *DEFAULT_BASELINES,
    "translated",
    "translated_sdedit",
    "augmented_aligned",
    "unjudged",
)
# HarnessConfig.judge -> the condition whose segmenter the alignments use
JUDGES = {"source": "source", "augmented": "source+augmented"}
# AlignConfig weight -> the field the judge's checkpoint fills when that weight is > 0
JUDGE_WEIGHTS = {"class_anchor_weight": "anchor_segmenter", "judge_weight": "judge_segmenter"}


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
        sdedit_start: the t0 that ``translated_sdedit`` translates real images from
            (``AlignConfig.start_time``).
        judge: None, or the arm (``"source"`` or ``"augmented"``) whose segmenter of the
            same replicate every alignment uses: to label the references for the class
            anchors (``AlignConfig.anchor_segmenter``, with ``align.class_anchor_weight`` >
            0) and as the judge term's judge (``AlignConfig.judge_segmenter``, with
            ``align.judge_weight`` > 0); one of the two weights must be > 0. Arms are
            trained in table order, so that segmenter exists before the aligned arms are
            built.
        synthetic_fraction: the share of every training batch an arm with synthetic pairs
            draws from them (``TrainConfig.synthetic_fraction``; 0: every slice alike, so
            the share follows the counts, 96 synthetic to 96 real by default).
        segmenter: ``TrainConfig`` fields of the downstream segmenter.
        synth: ``SynthConfig`` fields of stage 1.
        draw_references: every replicate draws its K references at random with its seed
            (``AlignConfig.reference_seed``; nested: its K = 1 file is among its K = 5),
            so the gains average over which references a site gives, not one fixed
            first K; False: the first K files by name for every replicate.
        stage1_per_seed: train stage 1 once per replicate, seeded with the replicate's
            seed (``SynthConfig.seed``; ``synth`` must not set it), so every replicate
            draws, aligns and samples its own stage 1; False: one stage 1 for all.
        align: ``AlignConfig`` fields of stage 2 (``k`` and ``seed`` are set per run).
    """

    ks: tuple[int, ...] = (1, 5, 10)
    seeds: tuple[int, ...] = (0, 1, 2)
    n_synthetic: int = 96
    oracle: bool = True
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    augment_copies: int = 1
    sdedit_start: float = 0.5
    synthetic_fraction: float = 0.0
    judge: str | None = None
    segmenter: dict = field(default_factory=lambda: {"size": 64, "steps": 200, "val_fraction": 0})
    synth: dict = field(default_factory=dict)
    align: dict = field(default_factory=dict)
    stage1_per_seed: bool = False
    draw_references: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {BASELINES}")
        if not self.seeds or self.augment_copies < 1 or self.n_synthetic < 1:
            raise ValueError("need seeds, augment_copies >= 1 and n_synthetic >= 1")
        if not 0.0 < self.sdedit_start < 1.0:
            raise ValueError(f"sdedit_start must be in (0, 1), got {self.sdedit_start}")
        if not 0.0 <= self.synthetic_fraction < 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1), got {self.synthetic_fraction}")
        if self.stage1_per_seed and "seed" in self.synth:
            raise ValueError("stage1_per_seed seeds stage 1 by replicate: synth.seed is not used")
        if self.draw_references and self.align.get("reference_seed") is not None:
            raise ValueError(
                "draw_references shuffles by replicate: align.reference_seed is not used"
            )
        self._check_judge()

    def _check_judge(self) -> None:
        if self.judge is None:
            if float(self.align.get("judge_weight", 0.0)) > 0:
                raise ValueError(
                    "align.judge_weight > 0 needs a judge (HarnessConfig.judge, --judge)"
                )
            if "unjudged" in self.baselines:
                raise ValueError("the unjudged control leaves out a judge: it needs --judge")
            return
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {sorted(JUDGES)}, got {self.judge}")
        if self.judge != "source" and self.judge not in self.baselines:
            raise ValueError(f"judge {self.judge!r} needs that baseline to run")
        if not any(float(self.align.get(w, 0.0)) > 0 for w in JUDGE_WEIGHTS):
            raise ValueError(
                "a judge serves the class anchors or the judge term: it needs "
                "align.class_anchor_weight > 0 or align.judge_weight > 0"
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


@dataclass
class _Harness:
    """One harness run's inputs and what it has built so far (datasets, alignments)."""

    source: Path
    target: Path
    out: Path
    cfg: HarnessConfig
    stage1: dict[int, Path]  # replicate seed -> its stage-1 checkpoint
    device: str
    reuse: bool
    say: Callable[[str], None]
    built: dict = field(default_factory=dict)
    # (condition, seed) -> its segmenter's checkpoint, as the arms are trained
    checkpoints: dict = field(default_factory=dict)
    # K (mask-flow route) or "<synthetic set>" (real-mask routes) -> seed -> align.json
    alignment: dict = field(default_factory=dict)

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

    def model(self, seed: int) -> SynthModel:
        """The stage-1 model of replicate ``seed``."""
        return SynthModel.load(self.stage1[seed])

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
    return h.dataset(f"{name}_seed{seed}", lambda p: h.sample(h.stage1[seed], p, seed, steps=steps))


def _real_draw(h: _Harness, seed: int) -> dict:
    """``n_synthetic`` real source masks and their images (drawn without replacement while
    they last, at the stage-1 model's size), as ``sample_dataset`` arguments; every arm on
    real masks draws the same ones for a seed."""
    masks, images = real_pairs(h.source, h.model(seed), h.cfg.n_synthetic, seed)
    return {"masks": masks, "images": images}


def _real_masks(h: _Harness, seed: int) -> Path:
    """Stage-1 images for the real source masks of :func:`_real_draw`."""

    def make(path: Path) -> None:
        h.sample(h.stage1[seed], path, seed, masks=_real_draw(h, seed)["masks"])

    return h.dataset(f"real_masks_seed{seed}", make)


def _augmented(h: _Harness, seed: int) -> Path:
    axis = h.model(seed).prep.slice_axis
    copies = h.cfg.augment_copies
    return h.dataset(
        f"augmented_seed{seed}", lambda p: augmented_dataset(h.source, p, copies, axis, seed)
    )


def _reference_seed(h: _Harness, seed: int) -> int | None:
    """The replicate's shuffle of the references (``AlignConfig.reference_seed``): its seed
    with ``draw_references``, else ``align.reference_seed`` (None: the first K by name)."""
    return seed if h.cfg.draw_references else AlignConfig(**h.cfg.align).reference_seed


def _histogram(h: _Harness, seed: int, k: int) -> Path:
    order = _reference_seed(h, seed)

    def make(path: Path) -> None:
        refs = read_references(h.target / "references", h.model(seed).prep, k, order)
        histogram_matched_dataset(h.source, refs, path)

    # deterministic: one for every replicate with the same references
    return h.dataset(f"histmatch_k{k}" + _drawn(order), make)


def _drawn(order: int | None) -> str:
    """The folder-name tail of references shuffled with ``order`` (none in name order), so
    that ``reuse`` never reads back a set aligned to other references."""
    return "" if order is None else f"_refs{order}"


@dataclass(frozen=True)
class _Route:
    """How stage 2 (and the sampling after it) gets its masks and starts its sampler
    (``AlignConfig.masks``, ``AlignConfig.start_time``)."""

    masks: str = "flow"
    start_time: float = 0.0
    judged: bool = True  # False: without HarnessConfig.judge (the ``unjudged`` control)

    @property
    def label(self) -> str:
        """The synthetic set's name without K: ``aligned``, ``translated``,
        ``translated t0=0.5``, ``aligned without judge``."""
        if self.masks == "flow":
            name = "aligned"
        else:
            name = "translated" + (f" t0={self.start_time:g}" if self.start_time else "")
        return name if self.judged else f"{name} without judge"

    def names(self, k: int, seed: int, order: int | None = None) -> tuple[str, str]:
        """The alignment's run folder and the dataset's folder: distinct per route and
        reference order (:func:`_drawn`), so that ``reuse`` reads back the alignment of
        this route and these references and no other."""
        tail = f"k{k}_seed{seed}" if self.judged else f"nojudge_k{k}_seed{seed}"
        tail += _drawn(order)
        if self.masks == "flow":
            return f"align_{tail}", f"aligned_{tail}"
        t0 = f"_t{self.start_time:g}" if self.start_time else ""
        return f"translate{t0}_{tail}", f"translated{t0}_{tail}"


FLOW = _Route()  # stage 2 as first built: mask-flow masks, sampler from noise
UNJUDGED = _Route(judged=False)  # the same, without the judge's segmenter


def _judge_fields(h: _Harness, seed: int, route: _Route) -> dict:
    """``AlignConfig`` fields that hand the alignment the judge's checkpoint of ``seed``
    (for every judge-fed weight > 0); for a route without the judge, judge weight 0 and
    no segmenter (class anchors, if weighted, from the mixture)."""
    if h.cfg.judge is None:
        return {}
    if not route.judged:
        return {"judge_weight": 0.0}
    judge = str(h.checkpoints[JUDGES[h.cfg.judge], seed])
    weights = AlignConfig(**h.cfg.align)
    return {field: judge for w, field in JUDGE_WEIGHTS.items() if getattr(weights, w) > 0}


def _aligned(h: _Harness, seed: int, k: int, route: _Route = FLOW) -> Path:
    """Source + pairs of the model aligned to the first ``k`` references along ``route``,
    sampled for mask-flow masks, or for the real masks (and images) of :func:`_real_draw`.
    Its ``align.json`` is kept under ``k`` (mask-flow route, as before the other routes) or
    the synthetic set's name."""
    order = _reference_seed(h, seed)
    run, name = route.names(k, seed, order)
    aligned = h.out / "synth" / run / "synth.pt"
    key = k if route == FLOW else f"{route.label} K={k}"
    done = seed in h.alignment.get(key, {}) or (h.reuse and aligned.exists())
    if not done:
        what = "" if route == FLOW else f" ({route.label})"
        h.say(f"stage 2{what}: aligning to K={k} reference(s), seed {seed}")
        fields = {"k": k, "seed": seed, "masks": route.masks, "start_time": route.start_time}
        fields["reference_seed"] = order
        fields.update(_judge_fields(h, seed, route))
        align(
            h.stage1[seed],
            h.target / "references",
            aligned.parent,
            AlignConfig(**{**h.cfg.align, **fields}),
            source=h.source if route.masks == "real" else None,
            device=h.device,
            force=True,
            quiet=True,
        )
    record = json.loads((aligned.parent / "align.json").read_text())
    h.alignment.setdefault(key, {})[seed] = record

    def make(path: Path) -> None:
        draw = _real_draw(h, seed) if route.masks == "real" else {}
        h.sample(aligned, path, seed, **draw)

    return h.dataset(name, make)


def _augmented_aligned(h: _Harness, seed: int, k: int, route: _Route = FLOW) -> Path:
    """The training set of an aligned arm (source + pairs aligned to K references along
    ``route``), every case, real or synthetic, with its augmented copies as in
    :func:`_augmented`."""
    aligned = _aligned(h, seed, k, route)
    axis = h.model(seed).prep.slice_axis
    copies = h.cfg.augment_copies
    return h.dataset(
        f"augmented_{route.names(k, seed, _reference_seed(h, seed))[1]}",
        lambda p: augmented_dataset(aligned, p, copies, axis, seed),
    )


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
    translations = [
        (_Route("real"), "translated"),
        (_Route("real", cfg.sdedit_start), "translated_sdedit"),
    ]
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
        *(
            Condition(
                f"source+{route.label} K={k}",
                partial(_aligned, k=k, route=route),
                f"{route.label} K={k}",
                baseline,
            )
            for route, baseline in translations
            for k in cfg.ks
        ),
        *(
            Condition(
                f"source+augmented+aligned K={k}",
                partial(_augmented_aligned, k=k),
                f"aligned K={k}, augmented",
                "augmented_aligned",
            )
            for k in cfg.ks
        ),
        *_unjudged(cfg),
    ]
    if cfg.oracle:
        arms.append(Condition(ORACLE, _target))
    if steps == stage1_steps:  # the equal-steps control would repeat source+unaligned
        arms = [c for c in arms if c.baseline != "equal_steps"]
    return [c for c in arms if c.baseline is None or c.baseline in cfg.baselines]


def _unjudged(cfg: HarnessConfig) -> list[Condition]:
    """The ``unjudged`` control's arms: aligned without the judge, for every K, and with
    ``augmented_aligned`` the same under augmentation."""
    label = UNJUDGED.label
    arms = [
        Condition(
            f"source+{label} K={k}",
            partial(_aligned, k=k, route=UNJUDGED),
            f"{label} K={k}",
            "unjudged",
        )
        for k in cfg.ks
    ]
    if "augmented_aligned" in cfg.baselines:
        arms += [
            Condition(
                f"source+augmented+{label} K={k}",
                partial(_augmented_aligned, k=k, route=UNJUDGED),
                f"{label} K={k}, augmented",
                "unjudged",
            )
            for k in cfg.ks
        ]
    return arms


def contrasts(conds: list[Condition], rows: list[dict], ks) -> list[dict]:
    """Paired differences that answer the reviewer's questions: every aligned K against the
    unaligned sets (with the aligned sampler's steps first: same steps, only the alignment
    differs), against strong augmentation and against histogram matching to the same K;
    then every translated K against stage-1 images for real masks (only the alignment
    differs) and against aligned (only the masks differ), and the translation from t0
    against the one from noise (only the start differs); then augmented + aligned against
    augmented (only the aligned pairs differ) and against aligned (only the augmentation);
    then judged against unjudged alignments, alone and augmented (only the judge)."""
    names = {c.name for c in conds}
    out = []
    for k in ks:
        aligned = f"source+aligned K={k}"
        unaligned = [c.name for c in conds if c.name.startswith("source+unaligned")]
        others = [*reversed(unaligned), "source+augmented", f"source hist-matched K={k}"]
        out += [paired_difference(rows, aligned, b) for b in others if b in names]
    for k in ks:
        translated = f"source+translated K={k}"
        sdedit = [
            c.name
            for c in conds
            if c.baseline == "translated_sdedit" and c.name.endswith(f" K={k}")
        ]
        pairs = [
            (translated, "source+stage-1 on real masks"),
            (translated, f"source+aligned K={k}"),
            *((name, translated) for name in sdedit),
        ]
        out += [paired_difference(rows, a, b) for a, b in pairs if a in names and b in names]
    for k in ks:  # what the aligned pairs add to augmentation, and augmentation to them
        both = f"source+augmented+aligned K={k}"
        pairs = [(both, "source+augmented"), (both, f"source+aligned K={k}")]
        out += [paired_difference(rows, a, b) for a, b in pairs if a in names and b in names]
    for k in ks:  # what the judge adds to an alignment, alone and under augmentation
        pairs = [
            (f"source+{arm} K={k}", f"source+{arm} without judge K={k}")
            for arm in ("aligned", "augmented+aligned")
        ]
        out += [paired_difference(rows, a, b) for a, b in pairs if a in names and b in names]
    return out


def _segmenter(cfg: HarnessConfig, cond: Condition) -> dict:
    """The segmenter's ``TrainConfig`` fields for ``cond``: with ``synthetic_fraction``, an
    arm that adds synthetic pairs draws that share of every batch from them."""
    if cond.synthetic is None or not cfg.synthetic_fraction:
        return cfg.segmenter
    return {**cfg.segmenter, "synthetic_fraction": cfg.synthetic_fraction}


def run_alignflow(
    source: str | Path,
    target: str | Path,
    out: str | Path,
    cfg: HarnessConfig,
    *,
    synth_model: str | Path | Sequence[str | Path] | None = None,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
    reuse: bool = False,
) -> dict:
    """Run the protocol of the module docstring into ``out``; returns ``results.json``.

    ``synth_model`` reuses stage-1 checkpoints instead of training them: one for every
    replicate, or one per replicate seed, in the order of ``cfg.seeds``.

    With ``reuse``, an alignment, a dataset or a segmenter run already complete in ``out``
    (from an earlier, interrupted or partly invalidated call) is read back instead of
    computed again; delete what must be redone."""
    source, target, out = Path(source), Path(target), Path(out)
    if (out / "results.json").exists() and not force:
        raise OutputExistsError(out / "results.json")
    _check_target(target)
    say = (lambda *a: None) if quiet else print
    t_start = time.perf_counter()
    stage1 = _stage1(source, out, cfg, synth_model, device, reuse, say)
    h = _Harness(source, target, out, cfg, stage1, device, reuse, say)
    conds = conditions(cfg, _sample_steps(stage1))
    rows = []
    for seed in cfg.seeds:  # replicate by replicate, arm by arm: its dataset, its segmenter
        for c in conds:
            arm = Arm(
                c.name,
                c.build(h, seed),
                _segmenter(cfg, c),
                test=target,
                tags={"condition": c.name},
            )
            got = run_protocol(
                [arm],
                (seed,),
                out,
                device=device,
                reuse=reuse,
                say=lambda m: say(f"segmenter on {m}"),
            )
            h.checkpoints.update({(r["condition"], r["seed"]): out / r["checkpoint"] for r in got})
            rows += got
    for r in rows:
        r["seeds_evaluated"] = len(cfg.seeds)
    record = results_record(
        rows,
        dataclasses.asdict(cfg),
        device,
        synth_model={str(seed): str(path) for seed, path in stage1.items()},
        seconds=time.perf_counter() - t_start,
        summary=summarise(rows),
        contrasts=contrasts(conds, rows, cfg.ks),
        **_grade_synthetic(h, conds, h.checkpoints),
        alignment={
            str(k): {
                str(seed): {
                    key: a[key]
                    for key in ALIGNMENT_FIELDS
                    if key in a  # class_means since class anchors, judge_* with a judge
                }
                for seed, a in by_seed.items()
            }
            for k, by_seed in h.alignment.items()
        },
    )
    write_results(out, record, markdown(record))
    return record


def _stage1(
    source: Path,
    out: Path,
    cfg: HarnessConfig,
    given: str | Path | Sequence[str | Path] | None,
    device: str,
    reuse: bool,
    say: Callable[[str], None],
) -> dict[int, Path]:
    """Replicate seed -> its stage-1 checkpoint: the ones given, or trained on the source
    into ``out/synth/stage1`` (``stage1_seed<r>`` with ``stage1_per_seed``; read back with
    ``reuse`` when there)."""
    if given is not None:
        paths = [given] if isinstance(given, (str, Path)) else list(given)
        if len(paths) not in (1, len(cfg.seeds)):
            raise ValueError(
                f"{len(paths)} stage-1 checkpoints for {len(cfg.seeds)} replicate seeds: "
                "give one, or one per seed"
            )
        return {seed: Path(paths[i % len(paths)]) for i, seed in enumerate(cfg.seeds)}
    if not cfg.stage1_per_seed:
        trained = _train_stage1(source, out / "synth" / "stage1", cfg.synth, device, reuse, say)
        return dict.fromkeys(cfg.seeds, trained)
    return {
        seed: _train_stage1(
            source,
            out / "synth" / f"stage1_seed{seed}",
            {**cfg.synth, "seed": seed},
            device,
            reuse,
            say,
        )
        for seed in cfg.seeds
    }


def _train_stage1(
    source: Path, run: Path, fields: dict, device: str, reuse: bool, say: Callable[[str], None]
) -> Path:
    if reuse and (run / "synth.pt").exists():
        return run / "synth.pt"
    seed = f", seed {fields['seed']}" if "seed" in fields else ""
    say(f"stage 1{seed}: mask flow + image flow on the source")
    return Path(
        train_synth(source, run, SynthConfig(**fields), device=device, force=True, quiet=True)
    )


def _sample_steps(stage1: dict[int, Path]) -> int:
    """The stage-1 sampler steps, the same for every replicate's stage 1 (the equal-steps
    control is one arm for all replicates)."""
    steps = {SynthModel.load(path).sample_steps for path in set(stage1.values())}
    if len(steps) > 1:
        raise ValueError(f"the stage-1 checkpoints sample with different steps: {sorted(steps)}")
    return steps.pop()


def _grade_synthetic(h: _Harness, conds: list[Condition], checkpoints: dict) -> dict:
    """Distances of every synthetic set of the first replicate (and the real source) to the
    target test images, faithfulness of the synthetic images to their masks (the first
    replicate's, and every replicate's under ``faithfulness_by_seed``: its sets judged by
    its own segmenters), and mask statistics."""
    cfg, device, first = h.cfg, h.device, h.cfg.seeds[0]
    spec = load_dataset(h.source)
    k_classes, channels = spec.num_classes, len(spec.channel_names)
    seg = TrainConfig(**cfg.segmenter)
    prep = plan_preprocessing(spec, spec.training, (seg.size, seg.size), seg.slice_axis)
    target_test = load_slices(load_dataset(h.target).test, prep, k_classes)

    def synthetic_sets(seed: int) -> dict:
        return {
            c.synthetic: _synthetic_slices(c.build(h, seed), prep, k_classes)
            for c in conds
            if c.synthetic
        }

    def faithfulness(seed: int, sets: dict) -> dict:
        judges = {"source_segmenter": checkpoints["source", seed]}
        if cfg.oracle:
            judges["oracle_segmenter"] = checkpoints[ORACLE, seed]
        return {
            name: {j: _faithfulness(ckpt, s, k_classes, device) for j, ckpt in judges.items()}
            for name, s in sets.items()
        }

    synthetic = synthetic_sets(first)
    by_seed = {str(first): faithfulness(first, synthetic)}
    by_seed.update({str(r): faithfulness(r, synthetic_sets(r)) for r in cfg.seeds[1:]})
    source_real = load_slices(spec.training, prep, k_classes)
    images = {"source real": source_real.images, **{n: s.images for n, s in synthetic.items()}}
    masks = {"source real": source_real.masks, **{n: s.masks for n, s in synthetic.items()}}
    return {
        "distances_to_target_test": _distances(images, target_test.images, channels),
        "faithfulness_dice": by_seed[str(first)],
        "faithfulness_by_seed": by_seed,
        "faithfulness_reference": {
            "source_segmenter_on_target_test": _faithfulness(
                checkpoints["source", first], target_test, k_classes, device
            ),
        },
        "mask_statistics": {name: mask_statistics(m, k_classes) for name, m in masks.items()},
    }
