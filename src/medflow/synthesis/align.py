"""Stage 2 of AlignFlow (``medflow synth align``): fine-tune the image flow so that its images
match K unlabelled reference images of a target site.

Objective, per step, for a batch of masks ``m`` drawn from the (frozen) mask flow and noise
``x0``::

    x_{i+1} = x_i + h * v_theta(x_i, t_i, m),   i = 0 .. N-1,  h = 1 / N   (Euler, with grad)
    L(theta) = MMD^2( phi(x_N), phi(references) )
               + lambda * mean_i | v_theta(x_i, t_i, m) - v_0(sg(x_i), t_i, m) |^2

``phi`` is the frozen random feature encoder of :mod:`medflow.synthesis.reward` applied to
the images as the segmenter will see them (:func:`medflow.synthesis.view.segmenter_view`:
written by ``synth sample`` and re-normalised by ``medflow train``), its statistics taken
over the tissue only; the references are prepared exactly as ``medflow train`` prepares a
target scan (:func:`read_references`). ``v_0`` is the stage-1 field (frozen copy), ``sg``
stop-gradient. The reward is back-propagated through all
``N`` sampler steps, each recomputed in the backward pass (gradient checkpointing) so memory
does not grow with ``N``. With ``class_anchor_weight`` w > 0 the loss adds
``w * mean_c (m_c - a_c)^2``: each class's mean in the batch (by its masks, over its tissue,
as the segmenter sees it) held to the target's, estimated from the references by a
mixture, or with ``anchor_segmenter`` as their class means under that segmenter's labels
(:mod:`medflow.synthesis.anchors`; experimental). The
regulariser keeps the field near stage 1's on the states the sampler visits (function
space, not weights): it lets the images' appearance move towards the site while the mask
condition keeps their structure; :func:`faithfulness` in the downstream harness checks
that it does.

With ``keep_outline`` (the default) every pixel that the frozen stage-1 flow leaves as
background, for the same mask and start, is set to the background level in ``x_N`` before
the reward sees it (:func:`medflow.synthesis.view.keep_outline`), and ``synth sample`` does
the same with the stage-1 network the aligned checkpoint keeps: the reward moves the
tissue's appearance and cannot grow the head into the background, which counts as tissue
once it is raised above the background level.

Translation from real masks (``AlignConfig.masks = "real"``): the masks are the labelled
source's training masks instead of mask-flow samples, so the images are aligned for real
anatomy. With ``start_time`` t0 > 0 (SDEdit-style) the sampler starts from the real image of
each mask partly noised, ``x_{t0} = (1 - t0) x0 + t0 x_real``, and runs its ``N`` steps from
t0 to 1 only, so the reward is back-propagated through the end of the trajectory.

The fine-tuned model is saved as a synthesis checkpoint whose default sampling is the same
``N``-step Euler the reward was optimised through, with an ``alignment`` record that holds
the route (``masks``, ``start_time``, ``source``), so that ``synth sample`` starts where
the reward was optimised.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medflow import __version__
from medflow.data.builtin import REFERENCE_SLICES
from medflow.data.datasets import prepare_image
from medflow.data.io import atomic_write, read_image
from medflow.data.layout import find_cases
from medflow.data.transforms import Preprocessing
from medflow.engine.logs import write_log
from medflow.engine.runtime import progress
from medflow.errors import DataError, MedflowError
from medflow.segmentation.predict import Predictor, SamplingOptions
from medflow.synthesis.anchors import ClassAnchors, class_means
from medflow.synthesis.config import AlignConfig
from medflow.synthesis.image_flow import ImageFlow
from medflow.synthesis.judge import SegmenterJudge
from medflow.synthesis.model import SynthModel, start_run
from medflow.synthesis.preview import save_grid
from medflow.synthesis.reward import FeatureEncoder, MMDReward
from medflow.synthesis.sample import draw_order, source_slices
from medflow.synthesis.view import foreground, keep_outline, segmenter_view, zero_level

CHECKPOINT = "synth.pt"
RUN_FILES = (CHECKPOINT, "align.json", "log.csv", "preview.png")
MASK_POOL_BATCHES = 8  # masks are drawn from a pool sampled once: the mask flow is frozen


@dataclass
class References:
    """The K reference images of a target site, as the segmenter sees a target scan.

    Attributes:
        images: ``(N, C, H, W)`` slices, each prepared with its whole file (cropped to the
            file's nonzero box, normalised over the file) exactly as ``medflow train`` and
            ``medflow predict`` prepare that file.
        foreground: ``(N, 1, H, W)`` bool, the tissue (:func:`~medflow.synthesis.view.foreground`
            above the file's normalised zero background; every pixel without one).
        files: the image files used.
    """

    images: torch.Tensor
    foreground: torch.Tensor
    files: list[str]


def _chosen_slices(folder: Path, prep: Preprocessing) -> dict[str, list[int]]:
    """``folder/slices.json`` (:data:`~medflow.data.builtin.REFERENCE_SLICES`): the slices of
    each listed file that are reference images; ``{}`` when there is none."""
    path = folder / REFERENCE_SLICES
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
        axis = int(record["slice_axis"])
        chosen = {str(k): [int(z) for z in v] for k, v in record["slices"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(path, f"is not a slice list {{slice_axis, slices}}: {exc}") from exc
    if axis != prep.slice_axis:
        raise DataError(
            path, f"names slices along axis {axis}, but the model slices along {prep.slice_axis}"
        )
    return chosen


def _zero_level(volume, slices: torch.Tensor) -> torch.Tensor | None:
    """Per channel, the normalised value of a volume's exact-zero background (the minimum of
    its prepared ``slices``, as for the source in :func:`.train.background_level`); None
    when under a tenth of its voxels are zero."""
    if (volume.array == 0).mean() < 0.1:
        return None
    return slices.amin(dim=(0, 2, 3))


def read_references(
    folder: str | Path, prep: Preprocessing, k: int | None, order_seed: int | None = None
) -> References:
    """The first ``k`` image files of ``folder`` (sorted by name, or shuffled with
    ``order_seed``), prepared exactly as the segmenter prepares a target scan with ``prep``
    (a volume gives all its slices, or those that ``folder/slices.json`` names for it, each
    prepared with the whole volume)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "reference folder not found")
    cases = find_cases(folder, None, len(prep.schemes))  # refuses an empty folder
    if k is not None and k > len(cases):
        raise DataError(folder, f"holds {len(cases)} reference image(s), fewer than k={k}")
    chosen = _chosen_slices(folder, prep)
    unknown = set(chosen) - {case.images[0].name for case in cases}
    if unknown:
        raise DataError(folder / REFERENCE_SLICES, f"names files not there: {sorted(unknown)}")
    if order_seed is not None:
        order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(order_seed))
        cases = [cases[i] for i in order.tolist()]
    cases = cases[:k] if k is not None else cases
    images, fg = [], []
    for case in cases:
        volume = read_image(case.images)
        slices, box = prepare_image(volume, prep)
        level = _zero_level(volume, slices)
        name = case.images[0].name
        if name in chosen:
            index = [z - box[prep.slice_axis].start for z in chosen[name]]
            if not all(0 <= i < len(slices) for i in index):
                raise DataError(case.images[0], f"slices {chosen[name]} are not all in its head")
            slices = slices[index]
        images.append(slices)
        fg.append(foreground(slices, level))
    files = [str(p) for case in cases for p in case.images]
    return References(torch.cat(images), torch.cat(fg), files)


@dataclass
class _Pool:
    """The masks stage 2 draws its batches from.

    Attributes:
        masks: ``(N, H, W)`` label maps.
        images: ``(N, C, H, W)`` the real images of real masks (as stage 1 trained on
            them); None for mask-flow samples.
    """

    masks: torch.Tensor
    images: torch.Tensor | None = None

    def evaluation(self, n: int, gen: torch.Generator):
        """Indices of the fixed evaluation batch: the first ``n`` mask-flow samples (random
        already), or ``n`` real masks drawn at random (the source's are in case order)."""
        return slice(0, n) if self.images is None else draw_order(len(self.masks), n, gen)

    def batch(self, flow, index, gen: torch.Generator, start: float):
        """The masks at ``index`` and the sampler's start for them: noise, or for ``start``
        > 0 their real images partly noised to ``start``."""
        masks = self.masks[index]
        x = flow.noise(masks, gen)
        return masks, (x if start == 0 else flow.noised(x, self.images[index], start))


def _mask_pool(model: SynthModel, cfg: AlignConfig, source, gen: torch.Generator) -> _Pool:
    if cfg.masks == "real":
        slices = source_slices(source, model)
        return _Pool(slices.masks, slices.images)
    # sampled once: the mask flow is frozen
    batches = [
        model.mask_flow.sample(cfg.batch_size, model.size, gen, model.sample_steps)
        for _ in range(MASK_POOL_BATCHES)
    ]
    return _Pool(torch.cat(batches))


@torch.no_grad()
def _generate(model: SynthModel, masks: torch.Tensor, x: torch.Tensor, cfg: AlignConfig):
    """Plain Euler (no graph) of the image flow from ``x`` at ``cfg.start_time``."""
    return model.image_flow.sample_with_grad(masks, x, cfg.sampler_steps, start=cfg.start_time)


def _outliner(model: SynthModel, stage1: ImageFlow, cfg: AlignConfig):
    """``(images, masks, x0) -> images`` with stage 1's background kept (module
    docstring), or None when ``cfg`` does not keep the outline or the samples have no zero
    background to keep."""
    level = zero_level(model.background_level, model.file_ending)
    if not cfg.keep_outline or level is None:
        return None

    def outline(images: torch.Tensor, masks: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = stage1.sample_with_grad(masks, x0, cfg.sampler_steps, start=cfg.start_time)
        return keep_outline(images, ref, level)

    return outline


def _viewer(model: SynthModel):
    """Generated images -> (what the segmenter will see of them, their foreground)."""
    return lambda x: segmenter_view(
        x, model.background_level, model.prep.schemes, model.file_ending
    )


def _check_request(checkpoint, cfg: AlignConfig, source) -> None:
    """What ``align`` refuses before it writes anything: real masks without their source,
    a judge weight without a judge, an anchor or judge checkpoint that is not there."""
    if cfg.masks == "real" and source is None:
        raise MedflowError(
            f"{checkpoint}: aligning on real masks needs the labelled source dataset "
            "(--source DATA)"
        )
    if cfg.judge_weight > 0 and cfg.judge_segmenter is None:
        raise MedflowError(
            f"{checkpoint}: the judge term (judge_weight {cfg.judge_weight:g}) needs a judge "
            "(--judge-segmenter CKPT)"
        )
    for what, path in (("anchor", cfg.anchor_segmenter), ("judge", cfg.judge_segmenter)):
        if path is not None and not Path(path).is_file():
            raise DataError(Path(path), f"{what} segmenter checkpoint not found")


def align(
    checkpoint: str | Path,
    references: str | Path,
    out: str | Path,
    cfg: AlignConfig,
    *,
    source: str | Path | None = None,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Fine-tune the image flow of ``checkpoint`` towards the images in ``references``;
    writes ``out/synth.pt`` and returns its path. ``source``, the labelled source dataset,
    gives the masks (and, for ``cfg.start_time > 0``, the images) of ``cfg.masks = "real"``."""
    _check_request(checkpoint, cfg, source)
    out = Path(out)
    dev, gen = start_run(
        out, RUN_FILES, force=force, device=device, threads=cfg.threads, seed=cfg.seed
    )
    model = SynthModel.load(checkpoint, dev)
    if model.alignment is not None:
        raise MedflowError(
            f"{checkpoint}: is already aligned (to {model.alignment['references'][:1]}...); "
            "align the stage-1 checkpoint instead"
        )
    refs = read_references(references, model.prep, cfg.k, cfg.reference_seed)
    pool = _mask_pool(model, cfg, source, gen)
    # a fixed evaluation batch: the same masks and noise before and after
    index = pool.evaluation(max(cfg.batch_size, 8), gen)
    eval_masks, eval_start = pool.batch(model.image_flow, index, gen, cfg.start_time)
    before = _generate(model, eval_masks, eval_start, cfg)
    stage1 = ImageFlow(copy.deepcopy(model.image_flow.net).requires_grad_(False).eval())
    outline = _outliner(model, stage1, cfg)
    see = _viewer(model)
    view_before, fg_before = see(before)
    reward = _reward(model, refs, (view_before, fg_before), cfg, dev)
    reward_before = float(reward(view_before, fg_before))
    anchors = _anchors(model, refs, (view_before, fg_before, eval_masks), cfg)
    judge = None
    if cfg.judge_weight > 0:
        judge = SegmenterJudge(cfg.judge_segmenter, _n_classes(model), dev)
    objective = (pool, reward, see, anchors, judge)
    rows = _fine_tune(model, stage1, outline, objective, cfg, gen, quiet)
    after = _generate(model, eval_masks, eval_start, cfg)
    if outline is not None:
        model.outline_flow = stage1
        after = keep_outline(after, before, zero_level(model.background_level, model.file_ending))
    contrast = _class_contrast(model, see, (before, after), eval_masks, anchors)
    judged = _judged(judge, see, (before, after), eval_masks)
    summary = {
        "config": cfg.to_dict(),
        "checkpoint": str(Path(checkpoint).resolve()),
        "references": refs.files,
        "reference_slices": int(refs.images.shape[0]),
        "reward_before": reward_before,
        "reward_after": float(reward(*see(after))),
        "reward_on": "segmenter view (re-normalised as synth sample + medflow train), tissue",
        "bandwidths": list(reward.bandwidths),
        "masks": cfg.masks,
        "start_time": cfg.start_time,
        "source": str(Path(source).resolve()) if cfg.masks == "real" else None,
        "pool_masks": len(pool.masks),
        "class_means": contrast,
        **judged,
        "seconds": rows[-1]["seconds"],
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "medflow_version": __version__,
    }
    n = min(8, refs.images.shape[0])
    real = [] if pool.images is None else [("source images", pool.images[index])]
    preview = [("references", refs.images[:n]), *real, ("before", before), ("aligned", after)]
    return _save(out, model, summary, rows, preview, eval_masks)


def _reward(model: SynthModel, refs: References, seen_before, cfg: AlignConfig, dev):
    """The reward: it compares the images as the segmenter will see them, over the tissue
    only, and its yardstick is calibrated on the stage-1 images ``seen_before`` (their view
    and tissue; see MMDReward)."""
    encoder = FeatureEncoder(
        len(model.channel_names), seed=cfg.encoder_seed, features=cfg.reward_features
    ).to(dev)
    view, fg = seen_before
    return MMDReward(
        encoder,
        refs.images.to(dev),
        ref_mask=refs.foreground.to(dev),
        scale_from=view,
        scale_mask=fg,
    )


def _n_classes(model: SynthModel) -> int:
    return max(model.labels.values()) + 1


def _anchors(model: SynthModel, refs: References, stage1_batch, cfg: AlignConfig):
    """The class-anchor term (:class:`~medflow.synthesis.anchors.ClassAnchors`) from the
    references (as the segmenter sees them) and the stage-1 evaluation batch ``(view, fg,
    masks)``: by the mixture, or by ``cfg.anchor_segmenter``'s labels of the references;
    None when ``cfg.class_anchor_weight`` is 0."""
    if cfg.class_anchor_weight == 0:
        return None
    view, fg, masks = stage1_batch
    n_classes = _n_classes(model)
    if cfg.anchor_segmenter is not None:
        labels = segmenter_labels(cfg.anchor_segmenter, refs.images, n_classes, str(view.device))
        ref_batch = (refs.images.to(view.device), refs.foreground.to(view.device), labels)
        return ClassAnchors.from_labels(ref_batch, view, fg, masks, n_classes)
    tissue = refs.foreground[:, 0].to(view.device)
    values = [refs.images[:, c].to(view.device)[tissue] for c in range(refs.images.shape[1])]
    return ClassAnchors.from_mixture(values, view, fg, masks, n_classes)


def segmenter_labels(
    checkpoint: str | Path, images: torch.Tensor, n_classes: int, device: str
) -> torch.Tensor:
    """The argmax labels ``(N, H, W)`` of :func:`segmenter_probs`."""
    return segmenter_probs(checkpoint, images, n_classes, device).argmax(1)


def segmenter_probs(
    checkpoint: str | Path, images: torch.Tensor, n_classes: int, device: str
) -> torch.Tensor:
    """The class probabilities ``(N, K, H, W)`` a ``medflow train`` checkpoint gives
    ``images`` ``(N, C, H, W)`` (prepared as it prepares a scan; its default sampling), at
    their size.

    Raises:
        DataError: the checkpoint is unreadable.
        MedflowError: it segments another number of classes than ``n_classes``."""
    path = Path(checkpoint)
    predictor = Predictor(path, device)
    with torch.no_grad():
        probs = predictor.probs(images.to(device), predictor.sampling(SamplingOptions()))
    if probs.shape[1] != n_classes:
        raise MedflowError(
            f"{path}: segments {probs.shape[1]} classes, the synthesis model {n_classes}"
        )
    if probs.shape[2:] != images.shape[2:]:
        probs = torch.nn.functional.interpolate(probs, size=images.shape[2:], mode="bilinear")
    return probs


def _judged(judge, see, images, masks) -> dict:
    """The judge's cross-entropy on the evaluation batch before and after alignment
    (``judge_before``, ``judge_after``); ``{}`` without a judge."""
    if judge is None:
        return {}
    with torch.no_grad():
        return {
            f"judge_{name}": float(judge(*see(x), masks))
            for name, x in zip(("before", "after"), images, strict=True)
        }


def _class_contrast(model: SynthModel, see, images, masks, anchors) -> dict:
    """The evaluation batch's mean per class and channel (segmenter view, by its masks, over
    its tissue) before and after alignment, and the anchors' record when the term was on:
    how much of the classes' contrast the alignment kept."""
    out = {
        name: class_means(*see(x), masks, _n_classes(model))[0].tolist()
        for name, x in zip(("before", "after"), images, strict=True)
    }
    return {**out, **(anchors.record() if anchors is not None else {})}


# what the checkpoint keeps of align.json; the route (masks, start_time, source) travels
# with the model so that synth sample starts where the reward was optimised
RECORD = ("config", "references", "reward_before", "reward_after", "masks", "start_time", "source")


def _save(out: Path, model: SynthModel, summary: dict, rows, preview, masks) -> Path:
    """The aligned run folder: ``align.json``, ``log.csv``, ``preview.png`` (``preview``
    rows over ``masks``) and the checkpoint, whose sampler is the aligned one."""
    model.alignment = {k: summary[k] for k in RECORD}
    model.sample_steps = summary["config"]["sampler_steps"]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / "align.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n")
    )
    write_log(out / "log.csv", list(rows[0]), rows)
    save_grid(out / "preview.png", [(t, x.cpu()) for t, x in preview], masks=masks)
    return model.save(out / CHECKPOINT)


def _fine_tune(
    model, stage1: ImageFlow, outline, objective, cfg: AlignConfig, gen, quiet: bool
) -> list[dict]:
    """The reward fine-tuning loop (module docstring) on ``model.image_flow``, in place;
    ``stage1`` is the frozen copy the regulariser compares with, ``outline`` None or
    :func:`_outliner`'s function, ``objective`` ``(pool, reward, see, anchors, judge)`` with
    ``anchors`` None or :func:`_anchors`' term and ``judge`` None or the
    :class:`~medflow.synthesis.judge.SegmenterJudge`. Returns the log rows."""
    pool, reward, see, anchors, judge = objective
    flow = model.image_flow
    frozen = stage1.net
    flow.net.train().requires_grad_(True)
    opt = torch.optim.AdamW(flow.net.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    rows, t0 = [], time.perf_counter()
    bar = progress(total=cfg.steps, quiet=quiet, desc="synth align", unit="step")
    for step in range(cfg.steps):
        index = torch.randint(len(pool.masks), (cfg.batch_size,), generator=gen)
        masks, x0 = pool.batch(flow, index, gen, cfg.start_time)
        cond = flow.encode(masks)
        drift = []

        def regularise(x, t, v, cond=cond, drift=drift):
            with torch.no_grad():
                v0 = frozen(x.detach(), t, cond)
            drift.append((v - v0).pow(2).mean())

        images = flow.sample_with_grad(
            masks, x0, cfg.sampler_steps, cfg.checkpointing, regularise, start=cfg.start_time
        )
        if outline is not None:
            images = outline(images, masks, x0)
        view, fg = see(images)
        r = reward(view, fg)
        reg = torch.stack(drift).mean()
        loss = r + cfg.reg_weight * reg
        anchor = None
        if anchors is not None:
            anchor = anchors(view, fg, masks)
            loss = loss + cfg.class_anchor_weight * anchor
        judged = None
        if judge is not None:
            judged = judge(view, fg, masks)
            loss = loss + cfg.judge_weight * judged
        if not torch.isfinite(loss):
            raise MedflowError(f"synth align: loss became {loss.item()} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.net.parameters(), 1.0)
        opt.step()
        sched.step()
        rows.append(
            {
                "step": step + 1,
                "reward": r.item(),
                "drift": reg.item(),
                "loss": loss.item(),
                **({} if anchor is None else {"anchor": anchor.item()}),
                **({} if judged is None else {"judge": judged.item()}),
                "seconds": time.perf_counter() - t0,
            }
        )
        bar.update(1)
        bar.set_postfix(mmd=f"{r.item():.4f}", drift=f"{reg.item():.4f}")
    bar.close()
    flow.net.eval().requires_grad_(False)
    return rows
