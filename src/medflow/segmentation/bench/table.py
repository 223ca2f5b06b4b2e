"""The bench's rows aggregated over seeds, and as a Markdown table."""

from __future__ import annotations

import statistics


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per dataset, budget, method and setting: means over the seeds it was
    evaluated on (Dice with its standard deviation and per-seed values), and how many seeds
    its method trained (``seeds_trained``; more than ``seeds`` for a slow setting)."""
    groups: dict[tuple, list[dict]] = {}
    trained: dict[tuple, set[int]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["budget"], r["method"], r["setting"]), []).append(r)
        trained.setdefault((r["dataset"], r["budget"], r["method"]), set()).add(r["seed"])
    out = []
    for (ds, budget, method, setting), rs in groups.items():
        dice = [r["foreground"]["dice"] for r in rs]

        def mean(key, rs=rs):
            return statistics.mean(r[key] for r in rs)

        out.append(
            {
                "dataset": ds,
                "budget": budget,
                "method": method,
                "setting": setting,
                "seeds": len(rs),
                "seeds_trained": len(trained[(ds, budget, method)]),
                "train_steps": rs[0]["train_steps"],
                "train_steps_all": sorted({r["train_steps"] for r in rs}),
                "parameters": rs[0]["parameters"],
                "gflops_per_image": rs[0]["gflops_per_image"],
                "evaluations_per_image": rs[0]["evaluations_per_image"],
                "latency_ms_per_image": mean("latency_ms_per_image"),
                "throughput_images_per_s": mean("throughput_images_per_s"),
                "peak_memory_mib": max(r["peak_memory_mib"] for r in rs),
                "dice": statistics.mean(dice),
                "dice_sd": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                "dice_per_seed": dice,
                "iou": statistics.mean(r["foreground"]["iou"] for r in rs),
                "hd95": statistics.mean(r["foreground"]["hd95"] for r in rs),
                "assd": statistics.mean(r["foreground"]["assd"] for r in rs),
                "per_class_dice": {
                    c: statistics.mean(r["per_class"][c]["dice"] for r in rs)
                    for c in rs[0]["per_class"]
                },
            }
        )
    return out


def _steps(a: dict) -> str:
    """The steps trained: one number, or (plateau budget) the mean and range over seeds."""
    steps = a["train_steps_all"]
    if len(steps) == 1:
        return str(steps[0])
    return f"{statistics.mean(steps):.0f} ({steps[0]}-{steps[-1]})"


def markdown_table(rows: list[dict]) -> str:
    """The aggregated rows as a Markdown table; a note under it when a setting was evaluated
    on fewer seeds than its method trained."""
    lines = [
        "| dataset | budget | method | setting | steps | seeds | params | GFLOPs/img | "
        "evals/img | latency ms/img | img/s | peak MiB | fg Dice | per class Dice | IoU | "
        "HD95 | ASSD |",
        "|" + "---|" * 17,
    ]
    fewer = False
    for a in aggregate(rows):
        per_class = ", ".join(f"{c} {d:.3f}" for c, d in a["per_class_dice"].items())
        sd = f" ± {a['dice_sd']:.3f}" if a["seeds"] > 1 else ""
        seeds = str(a["seeds"])
        if a["seeds"] < a["seeds_trained"]:
            seeds, fewer = f"{a['seeds']} of {a['seeds_trained']}*", True
        lines.append(
            f"| {a['dataset']} | {a['budget']} | {a['method']} | {a['setting']} | "
            f"{_steps(a)} | {seeds} | {a['parameters']:,} | "
            f"{a['gflops_per_image']:.3f} | {a['evaluations_per_image']} | "
            f"{a['latency_ms_per_image']:.1f} | {a['throughput_images_per_s']:.1f} | "
            f"{a['peak_memory_mib']:.0f} | {a['dice']:.4f}{sd} | {per_class} | "
            f"{a['iou']:.4f} | {a['hd95']:.2f} | {a['assd']:.2f} |"
        )
    if fewer:
        lines += [
            "",
            "\\* evaluated on the first seed only: more network calls per image than the "
            "bench's `first_seed_only_above` (results.json, `config`); latency timed on one "
            "slice, throughput on `latency_slices` slices.",
        ]
    return "\n".join(lines) + "\n"
