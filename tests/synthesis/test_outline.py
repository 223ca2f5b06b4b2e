"""Alignment keeps stage 1's outline (``AlignConfig.keep_outline``): the reward can change the
tissue's appearance but not grow the head into a zero background."""

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_SYNTH, make_nnunet_dataset, skull_strip

from medflow.synthesis.align import align
from medflow.synthesis.config import AlignConfig, SynthConfig
from medflow.synthesis.image_flow import ImageFlow
from medflow.synthesis.model import SynthModel
from medflow.synthesis.sample import sample_dataset
from medflow.synthesis.train import train_synth
from medflow.synthesis.view import BACKGROUND_TOLERANCE, keep_outline, zero_level


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    ds = make_nnunet_dataset(tmp_path_factory.mktemp("src") / "ds", n_train=4, n_test=2)
    return skull_strip(ds)


@pytest.fixture(scope="module")
def stage1(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1")
    return train_synth(source, out, SynthConfig(steps=60, lr=3e-3, **TINY_SYNTH), quiet=True)


def test_keep_outline_sets_stage1_background_and_passes_gradients_elsewhere():
    outline = torch.tensor([[[[-1.0, -0.95, 0.5, 2.0]]]])  # level -1: two background pixels
    images = torch.tensor([[[[3.0, 4.0, 5.0, 6.0]]]], requires_grad=True)
    kept = keep_outline(images, outline, -1.0)
    assert kept.tolist() == [[[[-1.0, -1.0, 5.0, 6.0]]]]
    kept.sum().backward()
    # the reward cannot move the background: no gradient reaches it
    assert images.grad.tolist() == [[[[0.0, 0.0, 1.0, 1.0]]]]
    assert BACKGROUND_TOLERANCE > 0.05  # -0.95 lies within the tolerance of the level
    # no zero background (or PNG samples, rescaled one by one): nothing to keep
    assert keep_outline(images, outline, None) is images
    assert zero_level(-1.0, ".png") is None and zero_level(-1.0, ".nii.gz") == -1.0
    with pytest.raises(ValueError, match="outline"):
        keep_outline(images, outline[..., :2], -1.0)


def _brighter(model: SynthModel, by: float) -> SynthModel:
    """``model`` whose image flow's velocity is ``by`` higher everywhere: its images are
    ``by`` brighter, the background included (what the reward did at reg_weight 0.1)."""
    shifted = copy.deepcopy(model)
    shifted.image_flow.net.head[-1].bias.data += by
    return shifted


def _written(folder: Path) -> np.ndarray:
    files = sorted((folder / "imagesTr").glob("synth_*_0000.nii.gz"))
    return np.concatenate([nib.load(f).get_fdata() for f in files], axis=-1)


def test_sampling_keeps_stage1_background_at_zero(stage1, tmp_path):
    model = SynthModel.load(stage1)
    assert model.background_level is not None  # the source has a zero background
    brighter = _brighter(model, 3.0)
    kept = copy.deepcopy(brighter)
    kept.outline_flow = ImageFlow(copy.deepcopy(model.image_flow.net))
    paths = {}
    for name, m in (("stage1", model), ("brighter", brighter), ("kept", kept)):
        (tmp_path / name).mkdir()
        paths[name] = m.save(tmp_path / name / "synth.pt")
        sample_dataset(paths[name], tmp_path / f"{name}_set", 6, seed=4, quiet=True)
    # a checkpoint round trip keeps (only) the outline network
    assert SynthModel.load(paths["stage1"]).outline_flow is None
    loaded = SynthModel.load(paths["kept"]).outline_flow.net.state_dict()
    for key, value in model.image_flow.net.state_dict().items():
        assert torch.equal(loaded[key], value)
    s1, bright, kept_img = (_written(tmp_path / f"{n}_set") for n in ("stage1", "brighter", "kept"))
    background = s1 == 0
    assert 0.1 < background.mean() < 0.9
    # without the outline the brighter flow fills the background; with it, the background
    # stays stage 1's and the tissue is the brighter flow's, pixel for pixel
    assert (bright[background] != 0).mean() > 0.9
    assert (kept_img[background] == 0).all()
    np.testing.assert_array_equal(kept_img[~background], bright[~background])


def test_alignment_cannot_grow_the_head_into_the_background(stage1, source, tmp_path):
    # a target whose scans fill the frame: the reward then pays for raising the background
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, path in enumerate(sorted((source / "imagesTs").glob("*.nii.gz"))):
        img = nib.load(path)
        data = img.get_fdata().astype(np.float32) + 60.0
        nib.save(nib.Nifti1Image(data, img.affine), str(refs / f"r{i}_0000.nii.gz"))
    sample_dataset(stage1, tmp_path / "stage1_set", 6, seed=4, quiet=True)
    background = _written(tmp_path / "stage1_set") == 0
    cfg = dict(k=2, steps=30, batch_size=4, sampler_steps=2, lr=5e-3, reg_weight=0.0, threads=1)
    models = {}
    for keep in (False, True):
        out = tmp_path / f"aligned_{keep}"
        models[keep] = SynthModel.load(
            align(stage1, refs, out, AlignConfig(keep_outline=keep, **cfg), quiet=True)
        )
        sample_dataset(out / "synth.pt", tmp_path / f"set_{keep}", 6, seed=4, quiet=True)
    grown = _written(tmp_path / "set_False")[background]
    kept = _written(tmp_path / "set_True")[background]
    assert (grown != 0).mean() > 0.02  # unguarded, the head grows into the background
    assert (kept == 0).all()
    # the aligned checkpoint keeps stage 1's image network for it, and only when asked to
    assert models[False].outline_flow is None
    assert models[True].alignment["config"]["keep_outline"] is True
    stage1_state = SynthModel.load(stage1).image_flow.net.state_dict()
    for key, value in stage1_state.items():
        assert torch.equal(models[True].outline_flow.net.state_dict()[key], value)
    assert any(
        not torch.equal(models[True].image_flow.net.state_dict()[k], v)
        for k, v in stage1_state.items()
    )
