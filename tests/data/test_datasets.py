import numpy as np
import pytest
import torch
from conftest import make_nnunet_dataset

from medflow.data.datasets import (
    load_slices,
    plan_preprocessing,
    prepare_image,
    split_cases,
    split_slab,
)
from medflow.data.io import read_image
from medflow.data.layout import load_dataset
from medflow.errors import DataError


def test_slices_at_training_size(tiny_dataset):
    spec = load_dataset(tiny_dataset)
    prep = plan_preprocessing(spec, spec.training, (16, 16))
    assert prep.slice_axis == 2  # the 2.5 mm axis is the coarsest
    s = load_slices(spec.training, prep, spec.num_classes)
    assert s.images.shape == (4 * 5, 1, 16, 16) and s.masks.shape == (20, 16, 16)
    assert s.masks.dtype == torch.uint8 and set(s.masks.unique().tolist()) == {0, 1, 2}
    assert s.case_ids[:5] == ["case00"] * 5
    # z-scored over nonzero voxels
    assert abs(s.images.mean().item()) < 0.3


def test_prepare_image_crops_to_nonzero(tmp_path):
    import nibabel as nib

    data = np.zeros((20, 30, 4), dtype=np.float32)
    data[5:15, 10:20] = 1.0 + np.random.rand(10, 10, 4)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "x.nii.gz"))
    from medflow.data.transforms import Preprocessing

    prep = Preprocessing(schemes=("zscore",), slice_axis=2, size=(8, 8))
    slices, box = prepare_image(read_image([tmp_path / "x.nii.gz"]), prep)
    assert box == (slice(5, 15), slice(10, 20), slice(0, 4))
    assert slices.shape == (4, 1, 8, 8)


def test_wrong_channel_count_names_the_file(tiny_dataset):
    from medflow.data.transforms import Preprocessing

    prep = Preprocessing(schemes=("zscore", "zscore"), slice_axis=2, size=(8, 8))
    img = read_image(load_dataset(tiny_dataset).training[0].images)
    with pytest.raises(DataError, match=r"case00_0000.nii.gz: has 1 channel\(s\)"):
        prepare_image(img, prep)


def test_case_split_is_disjoint_and_reproducible(tmp_path):
    spec = load_dataset(make_nnunet_dataset(tmp_path, n_train=7))
    tr, va = split_cases(spec.training, 0.3, seed=1)
    assert len(va) == 2 and len(tr) == 5
    assert not {c.case_id for c in tr} & {c.case_id for c in va}
    assert split_cases(spec.training, 0.3, seed=1) == (tr, va)
    assert split_cases(spec.training[:1], 0.3, seed=1) == (list(spec.training[:1]), [])


def test_slab_split_never_puts_neighbouring_slices_on_both_sides():
    train, val = split_slab(40, 0.2, gap=2)
    assert len(val) == 8 and np.all(np.diff(val) == 1)
    distance = np.abs(train[:, None] - val[None, :]).min()
    assert distance > 2
    assert len(train) == 40 - 8 - 4
    with pytest.raises(ValueError, match="too thin"):
        split_slab(5, 0.2, gap=3)
