import numpy as np
import pytest
import torch

from medflow.data.transforms import (
    Preprocessing,
    augment_batch,
    choose_slice_axis,
    ct_statistics,
    from_slices,
    nonzero_box,
    normalise,
    resize_labels,
    scheme_for,
    to_slices,
    with_context,
)


def test_schemes_follow_nnunet_channel_names():
    assert scheme_for("CT") == "ct" and scheme_for("ct") == "ct"
    assert scheme_for("T1") == "zscore" and scheme_for("FLAIR") == "zscore"
    assert scheme_for("noNorm") == "none" and scheme_for("rgb_to_0_1") == "rgb"
    assert scheme_for("CTA scan") == "zscore"  # only the exact reserved name means CT


def test_slice_axis_choice():
    assert choose_slice_axis((0.8, 0.8, 5.0), (256, 256, 30)) == 2
    assert choose_slice_axis((3.0, 0.7, 0.7), (40, 256, 256)) == 0
    assert choose_slice_axis((1.0, 1.0, 1.0), (10, 10, 10)) == 2
    assert choose_slice_axis((1.0, 1.0, 1.0), (64, 64, 1)) == 2
    assert choose_slice_axis((1.0, 1.0, 1.0), (64, 1, 64)) == 1


def test_zscore_uses_nonzero_voxels():
    img = np.zeros((1, 10, 10, 2), dtype=np.float32)
    img[0, 2:8, 2:8] = np.random.default_rng(0).normal(50, 5, (6, 6, 2))
    prep = Preprocessing(schemes=("zscore",), slice_axis=2, size=(8, 8))
    out = normalise(img, prep)
    inside = out[0, 2:8, 2:8]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-3


def test_ct_clips_and_scales_with_training_statistics():
    values = [np.arange(-1000, 1001, dtype=np.float32)]
    lo, hi, mean, std = ct_statistics(values)
    assert lo == pytest.approx(-990.0) and hi == pytest.approx(990.0)
    prep = Preprocessing(
        schemes=("ct",), slice_axis=2, size=(8, 8), ct_stats=((lo, hi, mean, std),)
    )
    out = normalise(np.array([-3000.0, 0.0, 3000.0], dtype=np.float32).reshape(1, 3, 1, 1), prep)
    assert out[0, 0, 0, 0] == pytest.approx((lo - mean) / std)
    assert out[0, 2, 0, 0] == pytest.approx((hi - mean) / std)


def test_channel_count_mismatch():
    prep = Preprocessing(schemes=("zscore", "zscore"), slice_axis=2, size=(8, 8))
    with pytest.raises(ValueError, match="1 channels, model expects 2"):
        normalise(np.zeros((1, 2, 2, 2), dtype=np.float32), prep)


def test_nonzero_box():
    img = np.zeros((2, 6, 7, 5))
    img[0, 1:3, 2, 4] = 1
    img[1, 4, 5, 0] = -1
    assert nonzero_box(img) == (slice(1, 5), slice(2, 6), slice(0, 5))
    assert nonzero_box(np.zeros((1, 3, 4, 2))) == (slice(0, 3), slice(0, 4), slice(0, 2))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_round_trip(axis):
    vol = np.random.randint(0, 3, (4, 5, 6))
    slices = to_slices(vol[None], axis)[:, 0]
    assert slices.shape[0] == vol.shape[axis]
    assert np.array_equal(from_slices(slices, axis), vol)


def test_resize_labels_keeps_label_values_and_identity():
    mask = torch.randint(0, 3, (2, 16, 16))
    assert torch.equal(resize_labels(mask, (16, 16), 3), mask)
    up = resize_labels(mask, (32, 32), 3)
    assert up.shape == (2, 32, 32) and set(up.unique().tolist()) <= {0, 1, 2}
    # a large block survives down- and up-sampling unchanged in its interior
    block = torch.zeros(1, 32, 32, dtype=torch.long)
    block[:, 8:24, 8:24] = 2
    small = resize_labels(block, (16, 16), 3)
    assert torch.all(small[:, 5:11, 5:11] == 2) and small[0, 0, 0] == 0


def test_augmentation_moves_image_and_mask_together():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(8, 32, 32, dtype=torch.long)
    mask[:, 6:20, 10:28] = 1
    mask[:, 22:28, 4:12] = 2
    image = mask.float()[:, None] * 10.0  # the image is the mask, so they must stay aligned
    aug_img, aug_mask = augment_batch(image, mask, 3, g, p_affine=1.0)
    assert aug_img.shape == image.shape and aug_mask.shape == mask.shape
    assert set(aug_mask.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(aug_mask, mask)  # something moved
    recovered = torch.round(aug_img[:, 0] / 10.0).clamp(0, 2).long()
    assert (recovered == aug_mask).float().mean() > 0.95


def test_context_stacks_neighbours_by_offset_and_repeats_the_edges():
    # 4 slices of 2 channels; every value names its slice and channel
    slices = (10 * torch.arange(4.0)[:, None] + torch.arange(2.0)[None])[..., None, None]
    slices = slices.expand(4, 2, 3, 3).contiguous()
    assert with_context(slices, 0) is slices
    out = with_context(slices, 1)
    assert out.shape == (4, 6, 3, 3)
    # slice 1: (slice 0 ch 0, slice 0 ch 1, slice 1 ch 0, slice 1 ch 1, slice 2 ch 0, ...)
    assert out[1, :, 0, 0].tolist() == [0, 1, 10, 11, 20, 21]
    # the first and last slices repeat themselves beyond the volume
    assert out[0, :, 0, 0].tolist() == [0, 1, 0, 1, 10, 11]
    assert out[3, :, 0, 0].tolist() == [20, 21, 30, 31, 30, 31]
    # the centre block is the slice itself
    assert torch.equal(out[:, 2:4], slices)
    assert Preprocessing(("zscore", "zscore"), 2, (3, 3), context=2).input_channels() == 10
