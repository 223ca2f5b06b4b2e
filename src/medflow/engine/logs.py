"""The training log: one CSV row per step, written atomically, read back on resume."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from medflow.data.io import atomic_write


def write_log(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Write ``rows`` as a CSV with ``columns`` (missing cells empty), atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="")
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def read_log_until(path: Path, step: int) -> list[dict]:
    """Rows of an earlier run's log up to the resumed step (a killed run may have logged
    steps after its last checkpoint; those are trained again). Cells are floats, ``step``
    an int; empty cells are left out."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    for r in rows:
        r["step"] = int(r["step"])
    return [r for r in rows if r["step"] <= step]


def read_log(path: str | Path) -> list[dict[str, float]]:
    """Every row of ``log.csv`` as floats (empty cells become NaN)."""
    with open(path, newline="") as f:
        return [
            {k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
            for row in csv.DictReader(f)
        ]
