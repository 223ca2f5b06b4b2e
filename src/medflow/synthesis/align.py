"""Stage 2 of AlignFlow (``medflow synth align``): fine-tune the image flow so that its images
match K unlabelled reference images of a target site.

Objective, per step, for a batch of masks ``m`` drawn from the (frozen) mask flow and noise
``x0``::

    x_{i+1} = x_i + h * v_theta(x_i, t_i, m),   i = 0 .. N-1,  h = 1 / N   (Euler, with grad)
    L(theta) = MMD^2( phi(x_N), phi(references) )
               + lambda * mean_i | v_theta(x_i, t_i, m) - v_0(sg(x_i), t_i, m) |^2

``phi`` is the frozen random feature encoder of :mod:`medflow.synthesis.reward`, ``v_0`` the
stage-1 field (frozen copy), ``sg`` stop-gradient. The reward is back-propagated through all
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
from pathlib import Path

import torch

from medflow import __version__
from medflow.data.datasets import prepare_image
from medflow.data.io import atomic_write, read_image
from medflow.data.layout import find_cases
from medflow.engine.logs import write_log
from medflow.engine.runtime import progress
from medflow.errors import DataError, MedflowError
from medflow.flows.samplers import euler
from medflow.synthesis.config import AlignConfig
from medflow.synthesis.model import SynthModel, start_run
from medflow.synthesis.preview import save_grid
from medflow.synthesis.reward import FeatureEncoder, MMDReward

CHECKPOINT = "synth.pt"
RUN_FILES = (CHECKPOINT, "align.json", "log.csv", "preview.png")
MASK_POOL_BATCHES = 8  # masks are drawn from a pool sampled once: the mask flow is frozen


def read_references(
    folder: str | Path, model: SynthModel, k: int | None
) -> tuple[torch.Tensor, list[str]]:
    """The first ``k`` image files of ``folder`` (sorted by name), prepared as the source
    was: ``(N, C, H, W)`` slices (a volume gives all its slices) and the files used."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "reference folder not found")
    cases = find_cases(folder, None, len(model.channel_names))  # refuses an empty folder
    if k is not None and k > len(cases):
        raise DataError(folder, f"holds {len(cases)} reference image(s), fewer than k={k}")
    cases = cases[:k] if k is not None else cases
    slices = [prepare_image(read_image(case.images), model.prep)[0] for case in cases]
    return torch.cat(slices), [str(p) for case in cases for p in case.images]


@torch.no_grad()
def _generate(model: SynthModel, masks: torch.Tensor, x0: torch.Tensor, steps: int):
    cond = model.image_flow.encode(masks)
    return euler(model.image_flow.velocity, x0, cond, steps)


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
    refs, ref_files = read_references(references, model, cfg.k)
    refs = refs.to(dev)

    flow = model.image_flow
    frozen = copy.deepcopy(flow.net).requires_grad_(False).eval()
    pool = torch.cat(
        [
            model.mask_flow.sample(cfg.batch_size, model.size, gen, model.sample_steps)
            for _ in range(MASK_POOL_BATCHES)
        ]
    )
    # a fixed evaluation batch: the same masks and noise before and after
    eval_masks = pool[: max(cfg.batch_size, 8)]
    eval_noise = flow.noise(eval_masks, gen)
    before = _generate(model, eval_masks, eval_noise, cfg.sampler_steps)
    encoder = FeatureEncoder(len(model.channel_names), seed=cfg.encoder_seed).to(dev)
    # the feature scale pools the references with stage-1 images: the spread between sites
    reward = MMDReward(encoder, refs, scale_from=before)
    reward_before = float(reward(before))

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
        r = reward(images)
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

    after = _generate(model, eval_masks, eval_noise, cfg.sampler_steps)
    summary = {
        "config": cfg.to_dict(),
        "checkpoint": str(Path(checkpoint).resolve()),
        "references": ref_files,
        "reference_slices": int(refs.shape[0]),
        "reward_before": reward_before,
        "reward_after": float(reward(after)),
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
    n = min(8, refs.shape[0])
    save_grid(
        out / "preview.png",
        [("references", refs[:n].cpu()), ("before", before.cpu()), ("aligned", after.cpu())],
        masks=eval_masks,
    )
    return model.save(out / CHECKPOINT)
