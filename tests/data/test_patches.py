import pytest
import torch

from medflow.data.patches import (
    PatchSampler,
    pad_to,
    planned_shape,
    resample_labels,
    resample_slices,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def corner_batch(b: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` identical slices whose only foreground is pixel (size-1, size-1)."""
    masks = torch.zeros(b, size, size, dtype=torch.long)
    masks[:, -1, -1] = 1
    return torch.randn(b, 1, size, size), masks


# planned_shape, resampling, padding


def test_planned_shape_keeps_physical_size():
    assert planned_shape((512, 512), (0.63, 0.63), (1.26, 1.26)) == (256, 256)
    assert planned_shape((100, 100), (1.0, 1.0), (0.5, 0.5)) == (200, 200)
    # anisotropic pixels become square ones: 2 mm x 1 mm at 1 mm keeps 60 mm x 50 mm
    assert planned_shape((30, 50), (2.0, 1.0), (1.0, 1.0)) == (60, 50)
    assert planned_shape((3, 3), (1.0, 1.0), (100.0, 100.0)) == (1, 1)  # never 0


@pytest.mark.parametrize("native, target", [((0.0, 1.0), (1.0, 1.0)), ((1.0, 1.0), (1.0, -2.0))])
def test_planned_shape_rejects_non_positive_spacing(native, target):
    with pytest.raises(ValueError, match="spacing"):
        planned_shape((10, 10), native, target)


def test_resample_slices_and_labels_to_planned_shape():
    x = torch.rand(2, 3, 20, 10)
    assert resample_slices(x, (10, 5)).shape == (2, 3, 10, 5)
    assert resample_slices(torch.ones(1, 1, 4, 4), (8, 6)).allclose(torch.ones(1, 1, 8, 6))
    masks = torch.zeros(2, 20, 10, dtype=torch.uint8)
    masks[:, :10] = 2  # top half class 2
    out = resample_labels(masks, (10, 5), num_classes=3)
    assert out.shape == (2, 10, 5) and out.dtype == torch.uint8
    assert (out[:, :5] == 2).all() and (out[:, 5:] == 0).all()
    raters = torch.stack([masks, torch.ones_like(masks)], dim=1)  # (N, R, H, W)
    out = resample_labels(raters, (40, 20), num_classes=3)
    assert out.shape == (2, 2, 40, 20)
    assert (out[:, 0, :20] == 2).all() and (out[:, 1] == 1).all()


def test_pad_to_pads_bottom_right_and_never_crops():
    x = torch.arange(6.0).reshape(1, 2, 3) + 1
    y = pad_to(x, (4, 2), value=-1)
    assert y.shape == (1, 4, 3)  # W=3 already >= 2: kept, not cropped
    assert torch.equal(y[:, :2, :3], x)  # content stays at the top-left
    assert (y[:, 2:] == -1).all()
    assert pad_to(x, (1, 1)) is x
    labels = torch.ones(2, 3, 1, 1, dtype=torch.uint8)  # any leading dims, integer dtype
    z = pad_to(labels, (2, 3))
    assert z.shape == (2, 3, 2, 3) and z.dtype == torch.uint8 and z.sum() == 6


# PatchSampler


def test_sampler_validates_arguments():
    with pytest.raises(ValueError, match="1.5"):
        PatchSampler(patch=(4, 4), num_classes=2, foreground_fraction=1.5)
    with pytest.raises(ValueError, match="0"):
        PatchSampler(patch=(0, 4), num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        PatchSampler(patch=(4, 4), num_classes=1)
    s = PatchSampler(patch=(4, 4), num_classes=2)
    images, masks = corner_batch(2, 8)
    with pytest.raises(ValueError, match="do not match"):
        s.sample(images, masks[:1], gen())
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        s.sample(images, masks * 2, gen())
    with pytest.raises(ValueError, match="dtype"):
        s.sample(images, masks.float(), gen())


def test_foreground_rows_are_the_last_round_fraction():
    s = PatchSampler(patch=(4, 4), num_classes=2)
    assert [s.foreground_rows(b) for b in (1, 2, 5, 9)] == [0, 1, 2, 3]  # rounded, not floored
    images, masks = corner_batch(9)
    p = PatchSampler(patch=(4, 4), num_classes=2).sample_with_offsets(images, masks, gen())
    assert p.centred.tolist() == [False] * 6 + [True] * 3


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (1.0, 1), (1 / 3, 0)])
def test_single_row_batches(fraction, expected):
    images, masks = corner_batch(1)
    s = PatchSampler(patch=(4, 4), num_classes=2, foreground_fraction=fraction)
    p = s.sample_with_offsets(images, masks, gen())
    assert p.images.shape == (1, 1, 4, 4) and p.masks.shape == (1, 4, 4)
    assert int(p.centred.sum()) == expected


def test_foreground_rows_always_hit_and_random_rows_are_unbiased():
    # 16 x 16 slices, one foreground pixel in the corner, 4 x 4 patches: a uniform crop
    # contains it with probability 1/13**2
    images, masks = corner_batch(300)
    s = PatchSampler(patch=(4, 4), num_classes=2, foreground_fraction=1 / 3)
    p = s.sample_with_offsets(images, masks, gen())
    hit = p.masks.flatten(1).any(1)
    assert hit[200:].all()  # every one of the 100 foreground rows
    assert hit[:200].float().mean() < 0.05
    # the random rows cover the whole range of offsets, not a biased corner of it
    assert p.offsets[:200].min() == 0 and p.offsets[:200].max() == 12
    assert (p.offsets[200:] == 12).all()  # centred on (15, 15), clamped into the slice


def test_foreground_rate_is_exact_for_any_fraction():
    images, masks = corner_batch(10)
    for fraction in (0.0, 0.2, 0.5, 1.0):
        s = PatchSampler(patch=(4, 4), num_classes=2, foreground_fraction=fraction)
        hit = s.sample(images, masks, gen(1))[1].flatten(1).any(1)
        assert hit[10 - round(10 * fraction) :].all()
        assert int(hit.sum()) >= round(10 * fraction)


def test_patch_is_centred_on_the_voxel_and_clamped_inside():
    masks = torch.zeros(3, 20, 20, dtype=torch.long)
    masks[0, 10, 12] = 1  # interior: centred exactly
    masks[1, 0, 19] = 1  # top-right corner: clamped
    masks[2, 19, 0] = 1  # bottom-left corner: clamped
    images = torch.randn(3, 1, 20, 20)
    s = PatchSampler(patch=(6, 5), num_classes=2, foreground_fraction=1.0)
    p = s.sample_with_offsets(images, masks, gen())
    assert p.offsets.tolist() == [[10 - 3, 12 - 2], [0, 15], [14, 0]]
    assert (p.masks.flatten(1).sum(1) == 1).all()


def test_class_balanced_picks_a_tiny_class_as_often_as_a_big_one():
    # class 1: left half (50 %), class 2: a 3 x 3 blob at the right edge; 8 x 8 patches
    # containing class 2 never reach class 1 (cols 0-31), so the two are told apart
    masks = torch.zeros(400, 64, 64, dtype=torch.long)
    masks[:, :, :32] = 1
    masks[:, 30:33, 60:63] = 2
    images = torch.zeros(400, 1, 64, 64)

    def share(balanced: bool) -> float:
        s = PatchSampler(
            patch=(8, 8), num_classes=3, foreground_fraction=1.0, class_balanced=balanced
        )
        _, m = s.sample(images, masks, gen(3))
        return (m == 2).flatten(1).any(1).float().mean().item()

    assert 0.4 < share(True) < 0.6  # 1/2 expected, sd 0.025 over 400 rows
    assert share(False) < 0.05  # 9 / (2048 + 9) expected


def test_slice_smaller_than_patch_is_padded():
    masks = torch.ones(2, 3, 5, dtype=torch.long)
    images = torch.full((2, 2, 3, 5), 7.0)
    s = PatchSampler(patch=(6, 4), num_classes=2, foreground_fraction=0.5)
    p = s.sample_with_offsets(images, masks, gen())
    assert p.images.shape == (2, 2, 6, 4) and p.masks.shape == (2, 6, 4)
    assert (p.offsets[:, 0] == 0).all() and (p.offsets[:, 1] <= 1).all()
    # real rows on top, padding (image 0, label 0) below
    assert (p.images[:, :, :3] == 7).all() and (p.images[:, :, 3:] == 0).all()
    assert (p.masks[:, :3] == 1).all() and (p.masks[:, 3:] == 0).all()


def test_same_seed_same_patches():
    masks = torch.randint(0, 3, (8, 12, 12))
    images = torch.randn(8, 2, 12, 12)
    s = PatchSampler(patch=(5, 5), num_classes=3, foreground_fraction=0.5, class_balanced=True)
    a, b, c = (s.sample_with_offsets(images, masks, gen(seed)) for seed in (5, 5, 6))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert torch.equal(a.offsets, b.offsets)
    assert not torch.equal(a.offsets, c.offsets)


def test_channels_stay_aligned_with_masks():
    masks = torch.zeros(16, 10, 10, dtype=torch.long)
    masks[:, 2:5, 6:9] = 1
    masks[::2, 7, 1] = 2
    images = torch.stack([torch.randn(16, 10, 10), masks.float(), -masks.float()], dim=1)
    s = PatchSampler(patch=(4, 3), num_classes=3, foreground_fraction=0.5, class_balanced=True)
    img, m = s.sample(images, masks.to(torch.uint8), gen())
    assert m.dtype == torch.uint8
    assert torch.equal(img[:, 1], m.float()) and torch.equal(img[:, 2], -m.float())


def test_foreground_row_without_foreground_falls_back_to_a_random_crop():
    masks = torch.zeros(40, 12, 12, dtype=torch.long)
    masks[::2, 5, 5] = 1  # odd rows have no foreground at all
    s = PatchSampler(patch=(4, 4), num_classes=2, foreground_fraction=1.0)
    p = s.sample_with_offsets(torch.randn(40, 1, 12, 12), masks, gen())
    assert p.centred.tolist() == [True, False] * 20
    assert (p.offsets[::2] == 3).all()
    empty = p.offsets[1::2]
    assert empty.min() >= 0 and empty.max() <= 8 and len(set(empty.flatten().tolist())) > 3
