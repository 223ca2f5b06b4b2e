"""Prediction with separate noise draws: maps on the input's grid, files beside the masks."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_TRAIN, make_nnunet_dataset
from PIL import Image

from medflow.data.io import read_image
from medflow.errors import OutputExistsError
from medflow.metrics.summary import evaluate_folders
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.predict import Predictor, SamplingOptions, predict_folder
from medflow.segmentation.train import train

TINY = {**TINY_TRAIN, "val_every": 10, "checkpoint_every": 10}


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("unc")
    data = make_nnunet_dataset(root / "ds")
    result = train(data, root / "run", TrainConfig(steps=2, **TINY), quiet=True)
    return data, result.final_checkpoint


def test_one_sample_gives_the_plain_label_map_and_zero_variance(flow_run):
    data, ckpt = flow_run
    predictor = Predictor(ckpt, device="cpu")
    vol = read_image([data / "imagesTs" / "case04_0000.nii.gz"])
    pred = predictor.predict_uncertain(vol, SamplingOptions(seed=3))
    assert np.array_equal(pred.labels, predictor.predict_volume(vol, SamplingOptions(seed=3)))
    assert pred.samples == 1 and not pred.variance.any()
    for m in (pred.confidence, pred.variance, pred.entropy):
        assert m.shape == vol.geometry.shape and m.dtype == np.float32
    assert pred.entropy.max() > 0.01 and pred.entropy.max() <= math.log(3) + 1e-5
    assert pred.confidence.min() >= 1 / 3 - 1e-5 and pred.confidence.max() <= 1 + 1e-6


def test_samples_disagree_and_vote_is_a_fusion(flow_run):
    data, ckpt = flow_run
    predictor = Predictor(ckpt, device="cpu")
    vol = read_image([data / "imagesTs" / "case04_0000.nii.gz"])
    mean = predictor.predict_uncertain(vol, SamplingOptions(samples=4))
    assert mean.samples == 4 and mean.variance.max() > 1e-4  # four noise draws differ
    assert mean.variance.max() <= 1 - 1 / 3 + 1e-5
    again = predictor.predict_uncertain(vol, SamplingOptions(samples=4))
    assert np.array_equal(mean.entropy, again.entropy)  # seeded: reproducible
    vote = predictor.predict_uncertain(vol, SamplingOptions(samples=4, fusion="vote"))
    # the maps come from the mean soft mask whatever the fusion; labels may differ a little
    assert np.array_equal(vote.entropy, mean.entropy)
    assert (vote.labels == mean.labels).mean() > 0.8


def test_unet_has_entropy_but_no_variance(tmp_path):
    data = make_nnunet_dataset(tmp_path / "ds", n_train=2, n_test=1)
    cfg = TrainConfig(steps=1, model="unet", seg_weight=0.0, **TINY)
    result = train(data, tmp_path / "run", cfg, quiet=True)
    vol = read_image([data / "imagesTs" / "case02_0000.nii.gz"])
    pred = Predictor(result.final_checkpoint, "cpu").predict_uncertain(
        vol, SamplingOptions(samples=3)
    )
    assert pred.samples == 1 and not pred.variance.any() and pred.entropy.max() > 0.01


def test_folder_gets_maps_beside_masks_and_evaluate_skips_them(flow_run, tmp_path):
    data, ckpt = flow_run
    opts = SamplingOptions(samples=2)
    out = tmp_path / "p"
    written = predict_folder(
        ckpt, data / "imagesTs", out, options=opts, quiet=True, uncertainty=True
    )
    assert [p.name for p in written] == ["case04.nii.gz", "case05.nii.gz"]
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "case04.nii.gz",
        "case04_entropy.nii.gz",
        "case04_variance.nii.gz",
        "case05.nii.gz",
        "case05_entropy.nii.gz",
        "case05_variance.nii.gz",
        "prediction.json",
    ]
    src = nib.load(str(data / "imagesTs" / "case04_0000.nii.gz"))
    ent = nib.load(str(out / "case04_entropy.nii.gz"))
    assert ent.shape == src.shape and np.allclose(ent.affine, src.affine)
    assert ent.get_data_dtype() == np.float32 and np.asarray(ent.dataobj).max() > 0
    record = json.loads((out / "prediction.json").read_text())
    assert record["options"]["samples"] == 2 and record["cases"] == ["case04", "case05"]
    summary = evaluate_folders(out, data / "labelsTs", tmp_path / "eval")
    assert summary["n_cases"] == 2

    # maps are outputs: no overwrite without force; a plain run with force removes them
    with pytest.raises(OutputExistsError):
        predict_folder(ckpt, data / "imagesTs", out, quiet=True, uncertainty=True)
    (out / "case04.nii.gz").unlink()
    (out / "case05.nii.gz").unlink()
    with pytest.raises(OutputExistsError, match="case04_variance"):
        predict_folder(ckpt, data / "imagesTs", out, quiet=True)
    predict_folder(ckpt, data / "imagesTs", out, quiet=True, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["case04.nii.gz", "case05.nii.gz"]


def test_png_maps_are_16_bit_scaled_to_their_maximum(tmp_path):
    data = make_nnunet_dataset(tmp_path / "ds", shape=(24, 20, 1), ending=".png", n_train=3)
    result = train(data, tmp_path / "run", TrainConfig(steps=1, **TINY), quiet=True)
    ckpt = result.final_checkpoint
    out = tmp_path / "p"
    opts = SamplingOptions(samples=3)
    predict_folder(ckpt, data / "imagesTs", out, options=opts, quiet=True, uncertainty=True)
    stored = np.asarray(Image.open(out / "case03_entropy.png"))
    assert stored.dtype == np.uint16 and stored.shape == (24, 20)
    vol = read_image([data / "imagesTs" / "case03_0000.png"])
    entropy = Predictor(ckpt, "cpu").predict_uncertain(vol, opts).entropy[:, :, 0]
    assert np.abs(stored / 65535 * math.log(3) - entropy).max() < 1e-4


def test_an_ensemble_is_the_mean_of_one_sample_calls_with_consecutive_seeds():
    """Sample j draws from seed + j, so maps or not, the same draws make the mean."""
    import torch

    from medflow.models.unet import NetConfig, SegNet
    from medflow.segmentation.inference import flow_probs

    torch.manual_seed(0)
    net = SegNet(NetConfig(in_channels=1, num_classes=3, channels=(8, 16)))
    images = torch.randn(5, 1, 16, 16)
    kw = dict(steps=2, batch_size=2)
    apart = flow_probs(net, images, samples=3, seed=4, per_sample=True, **kw)
    assert apart.shape == (3, 5, 3, 16, 16)
    for j in range(3):
        one = flow_probs(net, images, samples=1, seed=4 + j, **kw)
        assert torch.allclose(apart[j], one, atol=1e-6)
    assert not torch.allclose(apart[0], apart[1], atol=1e-3)  # different noise, different masks
    fused = flow_probs(net, images, samples=3, seed=4, **kw)
    assert torch.allclose(fused, apart.mean(0), atol=1e-6)
