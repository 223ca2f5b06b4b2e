"""Conditions of different AlignFlow harness runs, paired by replicate.

A harness run pairs its own conditions (``contrasts`` in its ``results.json``); a question
that spans two runs -- the same arm with another stage 1, other reward features or more
pairs -- needs its rows paired across the two files. Each ``--pair`` names a label and two
``FILE:CONDITION`` operands; the table gives ``a - b`` per metric with its Student-t
interval over the common seeds, the per-seed differences, and how far the two runs'
``source`` rows lie apart (0.00: the runs trained the same source-only segmenter per seed,
so the pairing removes the segmenter's seed as it does within one run).

    python benchmarks/alignflow_pair.py --out benchmarks/results/alignflow_pairs.json \\
        --pair "position masks" new.json:"source+aligned K=5" old.json:"source+aligned K=5"

Writes ``--out`` (JSON) and the table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medflow.synthesis.tables import METRICS, paired_across, with_ci


def operand(text: str) -> tuple[Path, str]:
    """``FILE:CONDITION`` -> (file, condition); the file part ends at the first ``.json:``."""
    path, sep, condition = text.partition(".json:")
    if not sep or not condition:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FILE.json:CONDITION")
    return Path(path + ".json"), condition


def rows_of(path: Path, condition: str, cache: dict) -> list[dict]:
    if path not in cache:
        try:
            cache[path] = json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: not a harness results.json ({exc})") from exc
    rows = cache[path]
    if not any(r["condition"] == condition for r in rows):
        names = sorted({r["condition"] for r in rows})
        raise ValueError(f"{path}: no condition {condition!r} (it has {names})")
    return rows


def table(entries: list[dict]) -> str:
    lines = [
        "| comparison | Δ mDice [95% CI] | per seed | Δ mIoU [95% CI] | seeds "
        "| source rows apart |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        seeds = ", ".join(f"{d:+.1f}" for d in e["dice_values"])
        apart = "" if e["shared_max_diff"] is None else f"{e['shared_max_diff']:.2f}"
        lines.append(
            f"| {e['label']} | {with_ci(e['dice'], e['dice_ci'])} | {seeds} | "
            f"{with_ci(e['iou'], e['iou_ci'])} | {e['seeds']} | {apart} |"
        )
    return "\n".join(lines) + "\n"


def pairs(specs: list[list[str]]) -> list[dict]:
    """One entry per ``(label, a, b)`` of ``--pair``: ``a`` minus ``b``
    (:func:`~medflow.synthesis.tables.paired_across`)."""
    cache: dict = {}
    entries = []
    for label, a, b in specs:
        (fa, ca), (fb, cb) = operand(a), operand(b)
        e = paired_across(rows_of(fa, ca, cache), ca, rows_of(fb, cb, cache), cb)
        entries.append({"label": label, "a": f"{fa}:{ca}", "b": f"{fb}:{cb}", **e})
    return entries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--pair",
        nargs=3,
        action="append",
        required=True,
        metavar=("LABEL", "A", "B"),
        help="label, FILE.json:CONDITION (a) and FILE.json:CONDITION (b): a minus b",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    try:
        entries = pairs(args.pair)
    except ValueError as exc:  # a missing file or condition: one line, nothing written
        print(f"alignflow_pair: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    record = {"metrics": list(METRICS), "pairs": entries}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    text = table(entries)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
