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
does not grow with ``N``. The regulariser keeps the field near stage 1's on the states the
sampler visits (function space, not weights): it lets the images' appearance move towards
the site while the mask condition keeps their structure; :func:`faithfulness` in the
downstream harness checks that it does.

The fine-tuned model is saved as a synthesis checkpoint whose default sampling is the same
``N``-step Euler the reward was optimised through, with an ``alignment`` record.
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
from medflow.flows.samplers import euler
from medflow.synthesis.config import AlignConfig
from medflow.synthesis.model import SynthModel, start_run
from medflow.synthesis.preview import save_grid
from medflow.synthesis.reward import FeatureEncoder, MMDReward
from medflow.synthesis.view import foreground, segmenter_view

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


def read_references(folder: str | Path, prep: Preprocessing, k: int | None) -> References:
    """The first ``k`` image files of ``folder`` (sorted by name), prepared exactly as the
    segmenter prepares a target scan with ``prep`` (a volume gives all its slices, or those
    that ``folder/slices.json`` names for it, each prepared with the whole volume)."""
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


@torch.no_grad()
def _generate(model: SynthModel, masks: torch.Tensor, x0: torch.Tensor, steps: int):
    cond = model.image_flow.encode(masks)
    return euler(model.image_flow.velocity, x0, cond, steps)


def _viewer(model: SynthModel):
    """Generated images -> (what the segmenter will see of them, their foreground)."""
    return lambda x: segmenter_view(
        x, model.background_level, model.prep.schemes, model.file_ending
    )


def align(
    checkpoint: str | Path,
    references: str | Path,
    out: str | Path,
    cfg: AlignConfig,
    *,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Fine-tune the image flow of ``checkpoint`` towards the images in ``references``;
    writes ``out/synth.pt`` and returns its path."""
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
    refs = read_references(references, model.prep, cfg.k)
    pool = torch.cat(
        [
            model.mask_flow.sample(cfg.batch_size, model.size, gen, model.sample_steps)
            for _ in range(MASK_POOL_BATCHES)
        ]
    )
    # a fixed evaluation batch: the same masks and noise before and after
    eval_masks = pool[: max(cfg.batch_size, 8)]
    eval_noise = model.image_flow.noise(eval_masks, gen)
    before = _generate(model, eval_masks, eval_noise, cfg.sampler_steps)
    see = _viewer(model)
    encoder = FeatureEncoder(len(model.channel_names), seed=cfg.encoder_seed).to(dev)
    # the reward compares the images as the segmenter will see them, over the tissue only;
    # its yardstick is calibrated on stage-1 images (see MMDReward)
    view_before, fg_before = see(before)
    reward = MMDReward(
        encoder,
        refs.images.to(dev),
        ref_mask=refs.foreground.to(dev),
        scale_from=view_before,
        scale_mask=fg_before,
    )
    reward_before = float(reward(view_before, fg_before))
    rows = _fine_tune(model, pool, reward, see, cfg, gen, quiet)
    after = _generate(model, eval_masks, eval_noise, cfg.sampler_steps)
    summary = {
        "config": cfg.to_dict(),
        "checkpoint": str(Path(checkpoint).resolve()),
        "references": refs.files,
        "reference_slices": int(refs.images.shape[0]),
        "reward_before": reward_before,
        "reward_after": float(reward(*see(after))),
        "reward_on": "segmenter view (re-normalised as synth sample + medflow train), tissue",
        "bandwidths": list(reward.bandwidths),
        "seconds": rows[-1]["seconds"],
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "medflow_version": __version__,
    }
    model.alignment = {k: summary[k] for k in ("config", "references", "reward_before")}
    model.alignment["reward_after"] = summary["reward_after"]
    model.sample_steps = cfg.sampler_steps
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / "align.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n")
    )
    write_log(out / "log.csv", list(rows[0]), rows)
    n = min(8, refs.images.shape[0])
    save_grid(
        out / "preview.png",
        [("references", refs.images[:n]), ("before", before.cpu()), ("aligned", after.cpu())],
        masks=eval_masks,
    )
    return model.save(out / CHECKPOINT)


def _fine_tune(model, pool, reward, see, cfg: AlignConfig, gen, quiet: bool) -> list[dict]:
    """The reward fine-tuning loop (module docstring) on ``model.image_flow``, in place;
    returns the log rows."""
    flow = model.image_flow
    frozen = copy.deepcopy(flow.net).requires_grad_(False).eval()
    flow.net.train().requires_grad_(True)
    opt = torch.optim.AdamW(flow.net.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    rows, t0 = [], time.perf_counter()
    bar = progress(total=cfg.steps, quiet=quiet, desc="synth align", unit="step")
    for step in range(cfg.steps):
        masks = pool[torch.randint(len(pool), (cfg.batch_size,), generator=gen)]
        x0 = flow.noise(masks, gen)
        cond = flow.encode(masks)
        drift = []

        def regularise(x, t, v, cond=cond, drift=drift):
            with torch.no_grad():
                v0 = frozen(x.detach(), t, cond)
            drift.append((v - v0).pow(2).mean())

        images = flow.sample_with_grad(masks, x0, cfg.sampler_steps, cfg.checkpointing, regularise)
        r = reward(*see(images))
        reg = torch.stack(drift).mean()
        loss = r + cfg.reg_weight * reg
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
                "seconds": time.perf_counter() - t0,
            }
        )
        bar.update(1)
        bar.set_postfix(mmd=f"{r.item():.4f}", drift=f"{reg.item():.4f}")
    bar.close()
    flow.net.eval().requires_grad_(False)
    return rows
