"""Clean-up of sampled masks: small islands go to their neighbours, small holes are filled,
large structures stay."""

import numpy as np
import pytest
import torch

from medflow.synthesis.mask_flow import MaskFlow
from medflow.synthesis.mask_post import MaskCleanup, clean_mask, clean_masks

CLEAN = MaskCleanup(min_size=6, max_hole=6)


def _disk(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_small_islands_take_the_label_around_them_large_ones_stay():
    lab = np.zeros((24, 24), dtype=np.uint8)
    lab[_disk(lab.shape, (12, 12), 8)] = 1  # a large region of class 1
    lab[11:13, 11:13] = 2  # a 4-pixel speck of class 2 inside it
    lab[1:3, 20:22] = 1  # a 4-pixel speck of class 1 in the background
    lab[18:22, 1:5] = 2  # a 16-pixel region of class 2 in the background: kept
    out = clean_mask(lab, 3, CLEAN)
    assert (out[11:13, 11:13] == 1).all() and (out[1:3, 20:22] == 0).all()
    assert (out[18:22, 1:5] == 2).all()
    changed = out != lab
    assert changed.sum() == 8  # nothing else moved


def test_an_island_goes_to_the_majority_of_its_border():
    lab = np.zeros((12, 12), dtype=np.uint8)
    lab[:, 4:] = 2  # class 2 on the right, background on the left
    lab[2:5, 0:4] = 1  # 12 pixels of class 1: kept
    lab[0, 8] = 1  # a lone pixel of class 1 inside class 2
    # a 4-pixel island on the bottom edge: 3 background and 5 class-2 pixels around it
    lab[10:12, 4:6] = 1
    out = clean_mask(lab, 3, CLEAN)
    assert out[0, 8] == 2 and (out[10:12, 4:6] == 2).all()
    assert (out[2:5, 0:4] == 1).all()
    # half background, half class 2 around it: a tie goes to the lower label
    tie = np.zeros((6, 6), dtype=np.uint8)
    tie[:, 3:] = 2
    tie[2:4, 2:4] = 1
    assert (clean_mask(tie, 3, CLEAN)[2:4, 2:4] == 0).all()


def test_small_holes_are_filled_large_ones_kept():
    lab = np.zeros((32, 32), dtype=np.uint8)
    lab[2:30, 2:30] = 1
    lab[6:8, 6:8] = 0  # 4-pixel hole of background: filled
    lab[20:22, 6:8] = 2  # 4-pixel hole holding class 2: filled (and removed as an island)
    lab[12:20, 14:22] = 0  # 64-pixel hole (a ventricle): kept
    lab[0:4, 28:32] = 0  # background reaching the border is no hole
    out = clean_mask(lab, 3, CLEAN)
    assert (out[6:8, 6:8] == 1).all() and (out[20:22, 6:8] == 1).all()
    assert (out[12:20, 14:22] == 0).all()
    assert (out[0:2, 30:32] == 0).all()
    # a hole touching its class only diagonally is not enclosed (4-connected background)
    diag = np.zeros((8, 8), dtype=np.uint8)
    diag[2:6, 2:6] = 1
    diag[3, 3] = 0
    diag[2, 2] = 0
    assert clean_mask(diag, 2, CLEAN)[3, 3] == 1 and clean_mask(diag, 2, CLEAN)[2, 2] == 0


def test_clean_masks_batches_keep_dtype_and_leave_clean_masks_alone():
    lab = np.zeros((2, 16, 16), dtype=np.uint8)
    lab[0, 2:10, 2:10] = 1
    lab[1, 4:12, 3:13] = 2
    masks = torch.from_numpy(lab)
    out = clean_masks(masks, 3, CLEAN)
    assert out.dtype == torch.uint8 and torch.equal(out, masks)
    noisy = masks.clone()
    noisy[0, 14, 14] = 2
    assert torch.equal(clean_masks(noisy, 3, CLEAN), masks)
    # idempotent: cleaning twice is cleaning once
    rng = np.random.default_rng(0)
    speckle = torch.from_numpy(rng.integers(0, 3, (3, 16, 16)).astype(np.uint8))
    once = clean_masks(speckle, 3, CLEAN)
    assert torch.equal(clean_masks(once, 3, CLEAN), once)
    assert not torch.equal(once, speckle)
    with pytest.raises(ValueError, match=">= 0"):
        MaskCleanup(min_size=-1)


def test_mask_flow_samples_are_cleaned_when_asked():
    flow = MaskFlow.build(3, (8, 16))
    torch.nn.init.normal_(flow.net.head[-1].weight)
    raw = flow.sample(4, (16, 16), torch.Generator().manual_seed(0), steps=2)
    flow.cleanup = CLEAN
    cleaned = flow.sample(4, (16, 16), torch.Generator().manual_seed(0), steps=2)
    assert torch.equal(cleaned, clean_masks(raw, 3, CLEAN))
    assert not torch.equal(cleaned, raw)
    assert MaskFlow.from_options(flow.net, flow.options()).cleanup == CLEAN
