"""Preview grids of generated image-mask pairs (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medflow.data.io import atomic_write


def save_grid(
    path: str | Path,
    rows: Sequence[tuple[str, torch.Tensor]],
    masks: torch.Tensor | None = None,
    columns: int = 8,
) -> Path:
    """One PNG: a row of images per ``(title, images (N, C, H, W))`` (first channel, each
    image scaled to its own 1st-99th percentile), then, if given, a row of the label maps
    ``(N, H, W)`` that condition them. Shows at most ``columns`` images per row; shorter
    rows leave their last cells empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (title, [imgs[i, 0].float().numpy() for i in range(min(columns, imgs.shape[0]))])
        for title, imgs in rows
    ]
    if masks is not None:
        panels.append(("masks", [masks[i].numpy() for i in range(min(columns, masks.shape[0]))]))
    n = max(len(images) for _, images in panels)
    fig, axes = plt.subplots(len(panels), n, figsize=(1.6 * n, 1.7 * len(panels)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (title, images) in enumerate(panels):
        for c, img in enumerate(images):
            ax = axes[r][c]
            ax.axis("on")
            if title == "masks":
                ax.imshow(img.T, cmap="viridis", interpolation="nearest", origin="lower")
            else:
                lo, hi = np.percentile(img, [1, 99])
                ax.imshow(img.T, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title.replace("$", r"\$"), fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return Path(path)
