"""The bench's figures: Dice against counted cost, and validation curves."""

from __future__ import annotations

import math
from pathlib import Path

from medflow.data.io import atomic_write
from medflow.engine.logs import read_log
from medflow.segmentation.bench.config import METHODS
from medflow.segmentation.bench.table import aggregate


def method_style(method: str) -> dict:
    """One colour and marker per bench method, the same in every panel and plot."""
    i = list(METHODS).index(method) if method in METHODS else len(METHODS)
    return {"color": f"C{i}", "marker": "os^vD<>"[i % 7]}


def plot_dice_vs_cost(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    panels = sorted({(a["dataset"], a["budget"]) for a in agg})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (ds, budget) in zip(axes[0], panels, strict=True):
        labelled = set()
        for a in (a for a in agg if (a["dataset"], a["budget"]) == (ds, budget)):
            style = method_style(a["method"])
            ax.errorbar(
                a["gflops_per_image"],
                a["dice"],
                yerr=a["dice_sd"],
                fmt=style["marker"],
                color=style["color"],
                capsize=3,
                label=None if a["method"] in labelled else a["method"],
            )
            labelled.add(a["method"])
            ax.annotate(
                a["setting"],
                (a["gflops_per_image"], a["dice"]),
                fontsize=6,
                color=style["color"],
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel("GFLOPs per image (log)")
        ax.set_ylabel("foreground Dice")
        ax.set_title(f"{ds}, equal {budget}")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_curves(rows: list[dict], out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted({(r["dataset"], r["budget"], r["method"], r["seed"], r["run"]) for r in rows})
    panels = sorted({(ds, b) for ds, b, *_ in runs})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for ds, budget, method, seed, run in runs:
            if (ds, budget) != panel:
                continue
            log = read_log(out / run / "log.csv")
            pts = [
                (int(r["step"]), r["val_dice"])
                for r in log
                if not math.isnan(r.get("val_dice", math.nan))
            ]
            if pts:
                color = method_style(method)["color"]
                ax.plot(*zip(*pts, strict=True), marker=".", color=color, label=f"{method} s{seed}")
        ax.set_xlabel("step")
        ax.set_ylabel("validation Dice")
        ax.set_title(f"{panel[0]}, equal {panel[1]}")
        ax.legend(fontsize=7)
    _save(fig, path)


def _write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _save(fig, path: Path) -> None:
    """Lay out, write as PNG (atomically) and close a figure."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _write(path, buf.getvalue())
