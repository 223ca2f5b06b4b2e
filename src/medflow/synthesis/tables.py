"""The AlignFlow harness's numbers and tables: per condition the mean and spread over
replicates, and paired gains with confidence intervals.

A replicate is one seed ``r``: every condition's segmenter is trained with seed ``r``, and
every synthetic set of replicate ``r`` is drawn (and every alignment run) with seed ``r``.
Two conditions are compared *paired*: the difference of their scores within each replicate,
then the mean difference and its Student-t interval over replicates,
``mean ± t_{0.975, n-1} s / sqrt(n)``. Pairing removes what the replicates share (the
segmenter's seed), which is most of the spread between seeds. With three replicates the
interval is wide and leans on the differences being roughly normal; a bootstrap over three
values would be no better. With one replicate there is no interval (None).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

METRICS = ("dice", "iou")


def paired_interval(differences: Sequence[float], level: float = 0.95) -> list[float] | None:
    """Student-t confidence interval ``[low, high]`` of the mean of paired ``differences``;
    None for fewer than two."""
    from scipy import stats

    n = len(differences)
    if n < 2:
        return None
    mean = statistics.fmean(differences)
    half = stats.t.ppf(0.5 + level / 2.0, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return [mean - half, mean + half]


def _scores(rows: list[dict], condition: str, metric: str) -> dict[int, float]:
    """Seed -> score (in %) of ``condition``."""
    return {r["seed"]: 100.0 * r["foreground"][metric] for r in rows if r["condition"] == condition}


def paired_difference(rows: list[dict], a: str, b: str) -> dict:
    """``a`` minus ``b`` per metric over the replicates both have: mean, interval, count."""
    out: dict = {"condition": a, "versus": b}
    for metric in METRICS:
        sa, sb = _scores(rows, a, metric), _scores(rows, b, metric)
        diffs = [sa[s] - sb[s] for s in sorted(set(sa) & set(sb))]
        out[metric] = statistics.fmean(diffs) if diffs else None
        out[f"{metric}_ci"] = paired_interval(diffs)
        out["seeds"] = len(diffs)
    return out


def paired_across(
    a_rows: list[dict], a: str, b_rows: list[dict], b: str, shared: str = "source"
) -> dict:
    """Condition ``a`` of one harness run minus ``b`` of another, paired by replicate, as
    :func:`paired_difference` pairs within a run (plus the per-seed ``{metric}_values``).

    Pairing across runs removes what the replicates share only where both runs trained the
    same segmenter for a seed: ``shared_max_diff`` is the largest difference (points) of the
    ``shared`` condition's scores over the common seeds (0: the runs reproduce each other;
    None: a run lacks it)."""
    rows = [{**r, "condition": "a"} for r in a_rows if r["condition"] == a]
    rows += [{**r, "condition": "b"} for r in b_rows if r["condition"] == b]
    out = {**paired_difference(rows, "a", "b"), "condition": a, "versus": b}
    for metric in METRICS:
        sa, sb = _scores(rows, "a", metric), _scores(rows, "b", metric)
        out[f"{metric}_values"] = [sa[s] - sb[s] for s in sorted(set(sa) & set(sb))]
    sa, sb = _scores(a_rows, shared, "dice"), _scores(b_rows, shared, "dice")
    common = sorted(set(sa) & set(sb))
    out["shared_max_diff"] = max((abs(sa[s] - sb[s]) for s in common), default=None)
    return out


def summarise(rows: list[dict], base: str = "source") -> list[dict]:
    """Per condition (in order of appearance): mean and standard deviation over replicates,
    the values, and the paired gain over ``base`` with its interval."""
    names = list(dict.fromkeys(r["condition"] for r in rows))
    out = []
    for name in names:
        entry: dict = {"condition": name}
        for metric in METRICS:
            values = list(_scores(rows, name, metric).values())
            entry["seeds"] = len(values)
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{metric}_values"] = values
        gain = paired_difference(rows, name, base) if base in names else None
        for metric in METRICS:
            entry[f"{metric}_gain"] = gain[metric] if gain else None
            entry[f"{metric}_gain_ci"] = gain[f"{metric}_ci"] if gain else None
        out.append(entry)
    return out


def with_ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return ""
    return f"{value:+.1f}" + ("" if ci is None else f" [{ci[0]:+.1f}, {ci[1]:+.1f}]")


def score_table(summary: list[dict]) -> list[str]:
    lines = [
        "| training data | mDice (%) | mIoU (%) | gain mDice [95% CI] | gain mIoU [95% CI] "
        "| seeds |",
        "|---|---|---|---|---|---|",
    ]
    for e in summary:
        gains = [with_ci(e[f"{m}_gain"], e[f"{m}_gain_ci"]) for m in METRICS]
        lines.append(
            f"| {e['condition']} | {e['dice']:.1f} ± {e['dice_std']:.1f} | "
            f"{e['iou']:.1f} ± {e['iou_std']:.1f} | {gains[0]} | {gains[1]} | {e['seeds']} |"
        )
    return lines


def contrast_table(contrasts: list[dict]) -> list[str]:
    if not contrasts:
        return []
    lines = [
        "",
        "Paired differences (same replicate: segmenter seed, synthetic draw, alignment seed):",
        "",
        "| comparison | Δ mDice [95% CI] | Δ mIoU [95% CI] | seeds |",
        "|---|---|---|---|",
    ]
    for c in contrasts:
        lines.append(
            f"| {c['condition']} − {c['versus']} | {with_ci(c['dice'], c['dice_ci'])} | "
            f"{with_ci(c['iou'], c['iou_ci'])} | {c['seeds']} |"
        )
    return lines


def markdown(record: dict) -> str:
    """The harness's results as markdown tables."""
    lines = score_table(record["summary"]) + contrast_table(record.get("contrasts", []))
    lines += ["", "| images | MMD² to target test | Fréchet distance |", "|---|---|---|"]
    for name, d in record["distances_to_target_test"].items():
        lines.append(f"| {name} | {d['mmd2']:.4f} | {d['frechet']:.2f} |")
    lines += _faithfulness_table(record)
    lines += _mask_table(record["mask_statistics"])
    ref = record["faithfulness_reference"]["source_segmenter_on_target_test"]
    lines += ["", f"Source segmenter on the real target test slices (same measure): {ref:.3f}", ""]
    return "\n".join(lines)


def _faithfulness_table(record: dict) -> list[str]:
    """Faithfulness of the first replicate's sets; with more replicates graded
    (``faithfulness_by_seed``), also the mean and range over all of them."""
    by_seed = list(record.get("faithfulness_by_seed", {}).values())
    spread = len(by_seed) > 1
    caption = f"Faithfulness: first replicate; mean [min, max] over {len(by_seed)} replicates."
    lines = [
        *(["", caption] if spread else []),
        "",
        "| synthetic set | Dice of source segmenter | Dice of oracle segmenter |",
        "|---|---|---|",
    ]

    def cell(name: str, judge: str) -> str:
        value = record["faithfulness_dice"][name].get(judge)
        if value is None:
            return ""
        if not spread:
            return f"{value:.3f}"
        all_ = [f[name][judge] for f in by_seed]
        return f"{value:.3f}; {statistics.mean(all_):.3f} [{min(all_):.3f}, {max(all_):.3f}]"

    for name in record["faithfulness_dice"]:
        lines.append(
            f"| {name} | {cell(name, 'source_segmenter')} | {cell(name, 'oracle_segmenter')} |"
        )
    return lines


def _mask_table(stats: dict) -> list[str]:
    classes = list(next(iter(stats.values())))
    lines = [
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
    return lines
