"""The reward sees generated images as the segmenter will: written by synth sample, read back
through the source's z-score, statistics over the tissue only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_reward import SMALL, phantoms

from medflow.data.transforms import Preprocessing, normalise
from medflow.synthesis.reward import FeatureEncoder, MMDReward
from medflow.synthesis.sample import to_raw
from medflow.synthesis.view import BACKGROUND_TOLERANCE, foreground, segmenter_view

LEVEL = -1.5  # the source's normalised zero background
PREP = Preprocessing(schemes=("zscore",), slice_axis=2, size=(32, 32))


def generated(n: int, seed: int) -> torch.Tensor:
    """Images as the image flow emits them: background at ``LEVEL``, tissue above it."""
    head = phantoms(n, 32, seed=seed)
    return torch.where(head > 0, LEVEL + 0.5 + 2.0 * head, torch.full_like(head, LEVEL))


def test_view_is_the_sample_then_read_round_trip():
    x = generated(6, seed=0)
    x[0, 0, :3, :3] = LEVEL - 0.4  # below the background level: written as background too
    view, fg = segmenter_view(x, LEVEL, PREP.schemes, ".nii.gz")
    # what synth sample writes for one stack of these six, and what medflow train reads
    stack = np.stack([to_raw(img[0].numpy(), LEVEL, ".nii.gz") for img in x], axis=-1)
    read = normalise(stack[None], PREP)[0]
    assert np.allclose(view[:, 0].permute(1, 2, 0).numpy(), read, atol=1e-5)
    assert torch.equal(fg[:, 0], torch.from_numpy(np.moveaxis(stack, -1, 0) != 0))
    assert not fg[0, 0, :3, :3].any()
    # without a zero background: the stack's z-score over every pixel
    view, fg = segmenter_view(x, None, PREP.schemes, ".nii.gz")
    assert fg.all() and view.mean().abs() < 1e-5 and (view.std(unbiased=False) - 1).abs() < 1e-4
    # PNG: each image on its own
    view, _ = segmenter_view(x, LEVEL, PREP.schemes, ".png")
    assert view.mean((1, 2, 3)).abs().max() < 1e-5


def test_foreground_rule():
    x = torch.full((1, 2, 2, 2), LEVEL)
    x[0, 1, 0, 0] = LEVEL + BACKGROUND_TOLERANCE  # one channel above is enough
    x[0, 0, 1, 1] = LEVEL + 0.5 * BACKGROUND_TOLERANCE
    assert foreground(x, LEVEL)[0, 0].tolist() == [[True, False], [False, False]]
    assert foreground(x, None).all()


def test_reward_ignores_what_the_normalisation_erases_and_sees_contrast():
    enc = FeatureEncoder(1, SMALL)
    target = generated(6, seed=2)
    # target site: another contrast of the tissue, read as the segmenter reads it
    target = torch.where(target > LEVEL, LEVEL + (target - LEVEL) ** 1.8, target)
    refs, ref_fg = segmenter_view(target, LEVEL, PREP.schemes, ".nii.gz")
    x = generated(8, seed=1)
    view, fg = segmenter_view(x, LEVEL, PREP.schemes, ".nii.gz")
    reward = MMDReward(enc, refs, ref_mask=ref_fg, scale_from=view, scale_mask=fg)
    base = reward(view, fg).item()

    def seen(images):
        return reward(*segmenter_view(images, LEVEL, PREP.schemes, ".nii.gz")).item()

    tissue = x > LEVEL
    # a gain of the tissue over the background level: synth sample + the reader's z-score
    # undo it exactly, so the reward must not move
    gained = LEVEL + 1.7 * (x - LEVEL)
    assert seen(gained) == pytest.approx(base, rel=1e-4)
    # the raw generator output (what the reward was computed on before) does move
    raw = MMDReward(enc, refs, ref_mask=ref_fg, scale_from=x, scale_mask=fg)
    assert abs(raw(gained, fg).item() - raw(x, fg).item()) > 0.1 * raw(x, fg).item()
    # a contrast change of the tissue survives the normalisation, and moving the images
    # towards the site's contrast lowers the reward
    towards = torch.where(tissue, LEVEL + (x - LEVEL) ** 1.8, x)
    away = torch.where(tissue, LEVEL + (x - LEVEL) ** 0.5, x)
    assert seen(towards) < 0.7 * base < base < 0.7 * seen(away)


def test_without_zero_background_gain_and_offset_are_invisible():
    enc = FeatureEncoder(1, SMALL)
    refs, _ = segmenter_view(generated(6, seed=2) ** 2, None, PREP.schemes, ".nii.gz")
    x = generated(8, seed=1)
    view, fg = segmenter_view(x, None, PREP.schemes, ".nii.gz")
    reward = MMDReward(enc, refs, scale_from=view)
    shifted = segmenter_view(1.7 * x + 0.4, None, PREP.schemes, ".nii.gz")
    assert fg.all() and reward(*shifted).item() == pytest.approx(reward(view).item(), rel=1e-4)


def test_tissue_statistics_do_not_measure_head_area():
    # the same head in a frame four times the area: over the tissue the features are the
    # same; over the whole frame they mostly measure how much background there is
    enc = FeatureEncoder(1, SMALL)
    head = generated(2, seed=4)
    frame = torch.nn.functional.pad(head, (16, 16, 16, 16), value=LEVEL)
    masked = [enc(v, v > LEVEL) for v in (head, frame)]
    plain = [enc(v) for v in (head, frame)]
    assert torch.allclose(masked[0], masked[1], atol=1e-3, rtol=1e-3)
    assert (plain[0] - plain[1]).abs().amax() > 0.1
