"""Training curves from a run's ``log.csv``."""

from __future__ import annotations

import math
from pathlib import Path

from medflow.data.io import atomic_write
from medflow.engine.logs import read_log


def plot_training_curves(log_csv: str | Path, out_png: str | Path) -> Path:
    """Draw loss terms against step and validation Dice against step into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_csv)
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("loss", "flow_loss", "seg_loss", "shortcut_loss"):
        # a run without shortcut rows logs 0 there: nothing to draw on a log scale
        if rows and key in rows[0] and (key != "shortcut_loss" or any(r[key] > 0 for r in rows)):
            ax_loss.plot(steps, [r[key] for r in rows], label=key, linewidth=1)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training loss")
    ax_loss.legend()
    # the mean and one column per class ("val_dice_<class>")
    val_keys = [k for k in (rows[0] if rows else {}) if k.startswith("val_dice")]
    for key in val_keys:
        pts = [(r["step"], r[key]) for r in rows if not math.isnan(r[key])]
        label = "mean" if key == "val_dice" else key[len("val_dice_") :]
        if pts:
            # class names come from dataset.json: "$" would start matplotlib's math text
            ax_val.plot(
                *zip(*pts), marker="o", markersize=3, label=label.replace("$", r"\$"), linewidth=1
            )
    ax_val.set_xlabel("step")
    ax_val.set_ylim(0, 1)
    ax_val.set_title("validation Dice (one step, EMA weights)")
    if ax_val.get_legend_handles_labels()[0]:
        ax_val.legend()
    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return Path(out_png)
