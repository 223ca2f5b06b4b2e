"""Does the mask flow draw anatomy? Stage-1 mask flows trained as today and with the options
of AlignFlow issue 14, compared with the real masks by shape (docs/ALIGNFLOW.md).

    python benchmarks/mask_flow.py --out runs/mask_flow

builds ``mni152-tissue`` into ``--out/data`` (unless ``--data`` names a copy), trains one
mask flow per training variant on its training slices at 64 x 64 with
:func:`medflow.synthesis.train.train_flows` (the loop of ``medflow synth train``), samples as
many masks as there are real training slices and scores both sets with
:func:`medflow.synthesis.shape_stats.shape_statistics` and the harness's diversity measure
(area mean/std, pairwise Dice). A position-conditioned flow is asked for the real slices'
positions, one sample per real slice; the others sample unconditionally. Every arm's
``dice_same_position`` is the mean foreground Dice between the sample drawn for a real slice
and that slice (what a flow blind to position can reach only by chance).

Today's stage 1 (``joint``) trains the image flow too: one optimiser and one clip over both
flows is the thing being compared. The other arms train the mask flow alone
(``mask_only``: with separate optimisers that is the mask flow a full run trains). An arm
with ``clean`` samples the flow of the arm it names and cleans the masks
(``mask_postprocess``), without training again. Writes ``mask_flow.json`` and
``mask_flow.md`` into ``--results`` and a preview (real masks, then each arm's samples for
the same slices) to ``--preview``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medflow.data.builtin import built
from medflow.metrics.overlap import dice_rows
from medflow.synthesis.config import SynthConfig
from medflow.synthesis.harness import mask_statistics
from medflow.synthesis.mask_post import MaskCleanup, clean_masks
from medflow.synthesis.shape_stats import shape_statistics
from medflow.synthesis.train import load_source, train_flows


@dataclass(frozen=True)
class Arm:
    """One mask flow to compare: its SynthConfig fields, and whether its samples are cleaned.

    ``trains`` names the arm whose flow it samples (itself when empty); ``long`` gives the
    mask flow ``--mask-steps`` steps instead of ``--steps``."""

    name: str
    fields: dict = field(default_factory=dict)
    long: bool = False
    clean: bool = False
    trains: str = ""


SEPARATE = {"separate_optimisers": True}
ARMS = (
    Arm("joint (today)"),
    Arm("separate", SEPARATE),
    Arm("separate, long", SEPARATE, long=True),
    Arm("long + position", {**SEPARATE, "position_condition": True}, long=True),
    Arm("long + sdf", {**SEPARATE, "mask_encoding": "sdf"}, long=True),
    Arm(
        "long + position + sdf",
        {**SEPARATE, "position_condition": True, "mask_encoding": "sdf"},
        long=True,
    ),
    Arm("long + position + sdf + clean", clean=True, trains="long + position + sdf"),
)


def config(arm: Arm, args: argparse.Namespace) -> SynthConfig:
    extra = {"mask_steps": args.mask_steps} if arm.long else {}
    return SynthConfig(
        size=args.size,
        steps=args.steps,
        seed=args.seed,
        threads=args.threads,
        **arm.fields,
        **extra,
    )


def same_position_dice(fake: torch.Tensor, real: torch.Tensor, num_classes: int) -> dict:
    """Per foreground class, the mean Dice between ``fake[i]`` and ``real[i]``."""
    return {
        str(c): float(dice_rows((fake == c).numpy(), (real == c).numpy()).mean())
        for c in range(1, num_classes)
    }


def sample(flow, n: int, size, positions, args, batch: int = 32) -> torch.Tensor:
    """``n`` masks from ``flow`` with seed ``args.seed``; at ``positions`` ``(n,)`` when the
    flow is position-conditioned."""
    gen = torch.Generator().manual_seed(args.seed)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        pos = None if flow.positions is None else positions[start : start + b]
        out.append(flow.sample(b, size, gen, args.sample_steps, positions=pos))
    return torch.cat(out)


def score(masks: torch.Tensor, real: torch.Tensor, k: int, small: int) -> dict:
    return {
        "shape": shape_statistics(masks, k, small),
        "diversity": mask_statistics(masks, k),
        "dice_same_position": same_position_dice(masks, real, k),
    }


def run_arm(arm: Arm, trained: dict, slices, k: int, args) -> tuple[dict, torch.Tensor]:
    """Train (or reuse) the arm's flow, sample and score it; ``trained`` caches flows."""
    source = arm.trains or arm.name
    reused = source in trained
    if not reused:
        src = next(a for a in ARMS if a.name == source)
        cfg = config(src, args)
        torch.manual_seed(cfg.seed)
        t0 = time.process_time()
        flows = train_flows(
            slices,
            k,
            slices.images.shape[1],
            cfg,
            torch.device(args.device),
            torch.Generator().manual_seed(cfg.seed),
            quiet=args.quiet,
            mask_only=cfg.separate_optimisers,
        )
        trained[source] = (flows.mask_flow, cfg, time.process_time() - t0, flows.rows)
    flow, cfg, cpu_s, rows = trained[source]
    rel = None if flow.positions is None else flow.positions.relative(slices.positions)
    t0 = time.process_time()
    masks = sample(flow, len(slices), tuple(slices.masks.shape[-2:]), rel, args)
    cleanup = MaskCleanup(cfg.mask_min_component, cfg.mask_max_hole)
    if arm.clean:
        masks = clean_masks(masks, k, cleanup)
    sample_s = time.process_time() - t0
    result = score(masks, slices.masks, k, cleanup.min_size)
    last = [r["mask_loss"] for r in rows if "mask_loss" in r][-20:]
    result.update(
        arm=arm.name,
        config=cfg.to_dict(),
        clean=arm.clean,
        mask_only=cfg.separate_optimisers,
        trained_by=source,
        train_cpu_seconds=0.0 if reused else cpu_s,
        sample_cpu_seconds=sample_s,
        final_mask_loss=float(np.mean(last)),
    )
    return result, masks


STAT_COLUMNS = (
    ("area", "area_mean"),
    ("area std", "area_std"),
    ("components", "components_mean"),
    ("boundary/area", "boundary_per_area"),
    ("in small comps", "small_fraction"),
)


def table(real: dict, results: list[dict], labels: dict) -> str:
    """One Markdown table per foreground class: real masks first, then every arm."""
    out = []
    for c, name in labels.items():
        head = " | ".join(h for h, _ in STAT_COLUMNS)
        out += [
            f"**{name}**",
            "",
            f"| masks | {head} | pairwise Dice | Dice, same slice | train CPU s |",
            "|---|" + "---|" * (len(STAT_COLUMNS) + 3),
        ]
        for r in [{"arm": "real training slices", **real}, *results]:
            s = r["shape"][c]
            cells = " | ".join(f"{s[key]:.3f}" for _, key in STAT_COLUMNS)
            pair = r["diversity"][c]["pairwise_dice"]
            same = r["dice_same_position"][c] if "dice_same_position" in r else None
            secs = r.get("train_cpu_seconds") if r.get("trained_by", r["arm"]) == r["arm"] else None
            out.append(
                f"| {r['arm']} | {cells} | {pair:.3f} | "
                f"{'' if same is None else f'{same:.3f}'} | "
                f"{'' if secs is None else f'{secs:.0f}'} |"
            )
        out.append("")
    return "\n".join(out)


def preview(path: Path, rows: list[tuple[str, torch.Tensor]], columns: int = 8) -> None:
    """One PNG: a row of label maps per ``(title, masks (N, H, W))``, the same slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0][1].shape[0]
    pick = np.linspace(0, n - 1, min(columns, n)).round().astype(int)
    fig, axes = plt.subplots(
        len(rows), len(pick), figsize=(1.5 * len(pick), 1.6 * len(rows)), squeeze=False
    )
    for r, (title, masks) in enumerate(rows):
        for j, i in enumerate(pick):
            ax = axes[r][j]
            ax.imshow(masks[i].numpy().T, cmap="viridis", vmin=0, vmax=2, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the data")
    parser.add_argument("--data", type=Path, default=None, help="default: build mni152-tissue")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1200, help="today's stage-1 steps")
    parser.add_argument("--mask-steps", type=int, default=3600, help="steps of 'long' arms")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    names = [a.name for a in ARMS]
    parser.add_argument("--arms", nargs="+", default=names, choices=names)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--preview", type=Path, default=Path("docs/img/mask_flow.png"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = args.data or built("mni152-tissue", args.out / "data" / "mni152-tissue")
    spec, slices, _ = load_source(data, args.size)
    k = spec.num_classes
    labels = {str(v): n for n, v in spec.labels.items() if v > 0}
    real = score(slices.masks, slices.masks, k, MaskCleanup().min_size)
    real.pop("dice_same_position")
    results, rows, trained = [], [("real", slices.masks)], {}
    for arm in (a for a in ARMS if a.name in args.arms):
        result, masks = run_arm(arm, trained, slices, k, args)
        results.append(result)
        rows.append((arm.name, masks))
        done = f"trained in {result['train_cpu_seconds']:.0f} CPU s"
        if result["trained_by"] != arm.name:
            done = f"samples the flow of {result['trained_by']!r}"
        print(f"{arm.name}: {done}", flush=True)
    text = table(real, results, labels)
    record = {
        "command": " ".join(sys.argv),
        "cores": len(os.sched_getaffinity(0)),
        "threads": args.threads,
        "train_slices": len(slices),
        "real": real,
        "arms": results,
        "table": text,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "mask_flow.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.results / "mask_flow.md").write_text(text)
    preview(args.preview, rows)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
