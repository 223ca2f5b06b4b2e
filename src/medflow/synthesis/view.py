"""Generated images as the downstream segmenter will see them, differentiably.

``synth sample`` writes a generated batch to disk (:func:`medflow.synthesis.sample.to_raw`)
and ``medflow train`` reads it back through the source's normalisation. For a z-scored
channel that round trip erases a global gain and offset of the foreground: a reward
computed on the raw generator output can therefore be lowered by changes the segmenter
never sees, and the alignment budget is spent on them. :func:`segmenter_view` applies the
same round trip to a batch with gradients, so the reward is computed on what the segmenter
is trained on, and :func:`foreground` says which pixels are tissue, so the reward's
statistics describe the head rather than how much of the frame it fills.

The round trip, per z-scored channel (other schemes pass through unchanged):

* a source with an exact zero background (``background_level`` set, NIfTI or TIFF):
  pixels within ``BACKGROUND_TOLERANCE`` of the background level (or below it) are written
  as 0 and the rest shifted by the level; the reader then z-scores the nonzero voxels of
  the whole stack (all voxels when fewer than a tenth are nonzero). A stack holds one
  batch's worth of independent samples, so the batch is normalised jointly here;
* no zero background: written as generated, z-scored over the whole stack (the batch);
* PNG: each image scaled to 0..255 and read back on its own, i.e. z-scored per image (its
  one minimal pixel, read as background, is ignored here).

The reader's crop to the stack's nonzero box is not applied: the generated frame already
is the source's cropped frame, and the union box of a stack of different heads covers
nearly all of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medflow.data.io import PNG_ENDINGS

BACKGROUND_TOLERANCE = 0.1  # normalised units: ~0.1 standard deviations of the foreground
_MIN_FOREGROUND = 0.1  # the reader z-scores over nonzero voxels only above this fraction
_EPS = 1e-6


def foreground(images: torch.Tensor, level: float | torch.Tensor | None) -> torch.Tensor:
    """Pixels of ``images`` ``(B, C, H, W)`` that are tissue: at least
    ``BACKGROUND_TOLERANCE`` above the background ``level`` (a float or per channel ``(C,)``)
    in any channel; every pixel when ``level`` is None. Returns ``(B, 1, H, W)`` bool."""
    if level is None:
        return torch.ones_like(images[:, :1], dtype=torch.bool)
    level = torch.as_tensor(level, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    return (images - level >= BACKGROUND_TOLERANCE).any(1, keepdim=True)


def zero_level(background_level: float | None, ending: str) -> float | None:
    """The normalised level that ``synth sample`` writes as the zero background, for samples
    written with ``ending``: None for PNG (each image is rescaled on its own) or a source
    without a zero background."""
    return None if ending.lower() in PNG_ENDINGS else background_level


def keep_outline(
    images: torch.Tensor, outline: torch.Tensor, level: float | torch.Tensor | None
) -> torch.Tensor:
    """``images`` ``(B, C, H, W)`` with every pixel that is background in ``outline`` (the
    same shape: stage 1's images for the same masks and start) set to the background
    ``level``; the rest unchanged (and differentiable). Without a zero background
    (``level`` None) there is no outline to keep: ``images`` is returned as it is."""
    if level is None:
        return images
    if outline.shape != images.shape:
        raise ValueError(f"outline {tuple(outline.shape)} for images {tuple(images.shape)}")
    fg = foreground(outline.detach(), level)
    level = torch.as_tensor(level, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    return torch.where(fg, images, level.expand_as(images))


def _zscore(x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``x`` minus the mean, over the standard deviation, of its values in ``region`` (the
    reader's z-score, population std as numpy's); gradients flow through the statistics."""
    w = region.to(x.dtype)
    n = w.sum().clamp_min(1.0)
    mean = (x * w).sum() / n
    std = (((x - mean) ** 2 * w).sum() / n).sqrt()
    return (x - mean) / std.clamp_min(_EPS)


def segmenter_view(
    images: torch.Tensor,
    background_level: float | None,
    schemes: Sequence[str],
    ending: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A generated batch ``(B, C, H, W)`` as ``medflow train`` will read it after
    ``synth sample`` wrote it (module docstring), and its foreground.

    Args:
        images: generated images in the source's normalised units.
        background_level: the source's normalised zero background (``SynthModel``'s), or None.
        schemes: normalisation scheme per channel (``Preprocessing.schemes``).
        ending: the file ending the samples are written with.

    Returns:
        ``(view, fg)``: ``view`` ``(B, C, H, W)``, differentiable in ``images``; ``fg``
        ``(B, 1, H, W)`` bool (:func:`foreground` of the generated images; no gradient).
    """
    if images.ndim != 4 or images.shape[1] != len(schemes):
        raise ValueError(f"expected images (B, {len(schemes)}, H, W), got {tuple(images.shape)}")
    png = ending.lower() in PNG_ENDINGS
    level = zero_level(background_level, ending)
    fg = foreground(images.detach(), level)
    channels = []
    for c, scheme in enumerate(schemes):
        x = images[:, c : c + 1]
        if scheme != "zscore":
            channels.append(x)
        elif png:
            ones = torch.ones_like(x[:1], dtype=torch.bool)
            channels.append(torch.cat([_zscore(xi[None], ones) for xi in x]))
        elif level is None:
            channels.append(_zscore(x, torch.ones_like(x, dtype=torch.bool)))
        else:
            tissue = (x - level).detach() >= BACKGROUND_TOLERANCE
            raw = torch.where(tissue, x - level, torch.zeros_like(x))
            region = tissue if tissue.float().mean() > _MIN_FOREGROUND else torch.ones_like(tissue)
            channels.append(_zscore(raw, region))
    return torch.cat(channels, 1), fg
