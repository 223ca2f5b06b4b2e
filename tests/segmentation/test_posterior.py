"""Posterior samples in one evaluation, on a toy problem whose posterior is known.

Every training image is the same picture; half of the masks cover its left half, half its
right half. Given the image the posterior is therefore 50/50 between two coherent masks:
its mean is 0.5 everywhere, and a sample is one half or the other. With the half to cover
shown in the image (bright), the posterior is one mask and samples must agree.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medflow.data.datasets import prepare_image
from medflow.data.io import read_image
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.predict import Predictor, SamplingOptions, predict_folder
from medflow.segmentation.train import train

SIZE = 16


def _halves_dataset(root, informative: bool):
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True)
    picture = 100 + np.random.default_rng(7).normal(0, 5, (SIZE, SIZE))
    for i in range(8):
        lab = np.zeros((SIZE, SIZE), np.uint8)
        if i % 2:
            lab[:, : SIZE // 2] = 1
        else:
            lab[:, SIZE // 2 :] = 1
        img = picture + (80 * lab if informative else 0)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            root / "imagesTr" / f"c{i:02d}_0000.png"
        )
        Image.fromarray(lab).save(root / "labelsTr" / f"c{i:02d}.png")
    meta = {"channel_names": {"0": "x"}, "labels": {"background": 0, "fg": 1}}
    meta.update(numTraining=8, file_ending=".png")
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module", params=[False, True], ids=["ambiguous", "unambiguous"])
def toy(request, tmp_path_factory):
    root = _halves_dataset(tmp_path_factory.mktemp("halves"), request.param)
    cfg = TrainConfig(
        size=SIZE, channels=(8, 16), batch_size=8, threads=1, steps=300, val_fraction=0,
        augment=False, warmup_steps=10,
    )  # fmt: skip
    result = train(root, root / "run", cfg, quiet=True)
    predictor = Predictor(result.final_checkpoint, "cpu")
    slices, _ = prepare_image(read_image([root / "imagesTr" / "c00_0000.png"]), predictor.prep)
    return request.param, root, predictor, slices


def _halves(predictor, slices, sampler, samples=8):
    """Mean foreground probability of the left and right halves, one row per sample."""
    probs = predictor.probs(
        slices, SamplingOptions(sampler=sampler, steps=1, samples=samples), True
    )
    fg = probs[:, 0, 1]
    return torch.stack([fg[:, :, : SIZE // 2].mean((1, 2)), fg[:, :, SIZE // 2 :].mean((1, 2))], 1)


def test_one_evaluation_samples_differ_only_where_the_posterior_is_ambiguous(toy):
    informative, _, predictor, slices = toy
    assert predictor.posterior  # trained with shortcut jumps by default
    samples = _halves(predictor, slices, "shortcut")
    mean = _halves(predictor, slices, "euler")
    if informative:
        # one answer: every sample and the mean cover the right half (image c00's)
        assert torch.all(samples[:, 1] > 0.8) and torch.all(samples[:, 0] < 0.2)
        assert (samples - samples.mean(0)).abs().max() < 0.1
    else:
        # the mean is undecided everywhere; samples commit to one half or the other
        assert torch.all((mean - 0.5).abs() < 0.2)
        committed = (samples[:, 0] - samples[:, 1]).abs() > 0.4
        assert committed.sum() >= 6
        picks_left = samples[committed, 0] > samples[committed, 1]
        assert picks_left.any() and (~picks_left).any()


def test_uncertain_prediction_keeps_the_mean_mask_and_the_samples_spread(toy, tmp_path):
    informative, root, predictor, _ = toy
    volume = read_image([root / "imagesTr" / "c00_0000.png"])
    options = SamplingOptions(samples=6)
    pred = predictor.predict_uncertain(volume, options, keep_samples=True)
    # maps or not, the same mask: the one-evaluation posterior mean, whatever --samples
    assert np.array_equal(pred.labels, predictor.predict_volume(volume, options))
    mean = predictor.probs(
        prepare_image(volume, predictor.prep)[0], SamplingOptions(sampler="euler", steps=1)
    )
    assert np.array_equal(pred.labels[:, :, 0], mean.argmax(1)[0].numpy())
    assert pred.sample_labels.shape == (6, SIZE, SIZE, 1)
    assert np.allclose(pred.probabilities.sum(-1), 1.0, atol=1e-5)
    if informative:
        assert pred.variance.max() < 0.05
    else:
        assert pred.variance.mean() > 0.1  # the two halves' samples disagree
    out = predict_folder(
        predictor.path, root / "imagesTr" / "c00_0000.png", tmp_path / "p", options=options,
        device="cpu", quiet=True, save_samples=True,
    )  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert [p.name for p in out] == ["c00.png"]
    assert [f"c00_sample{j:02d}.png" for j in range(6)] == [n for n in names if "_sample" in n]
    assert {"c00_probabilities.nii.gz", "c00_variance.png", "prediction.json"} <= set(names)
    saved = np.asarray(Image.open(tmp_path / "p" / "c00_sample03.png"))
    assert np.array_equal(saved, pred.sample_labels[3][:, :, 0])
    soft = read_image([tmp_path / "p" / "c00_probabilities.nii.gz"]).array  # (K, X, Y, 1)
    assert soft.shape == (2, SIZE, SIZE, 1)
    assert np.allclose(np.moveaxis(soft, 0, -1), pred.probabilities, atol=1e-6)
    _rerun_keeps_no_stale_samples(predictor, root, tmp_path / "p")


def _rerun_keeps_no_stale_samples(predictor, root, out):
    from medflow.errors import OutputExistsError

    image = root / "imagesTr" / "c00_0000.png"

    def again(**kw):
        predict_folder(predictor.path, image, out, device="cpu", quiet=True, **kw)

    with pytest.raises(OutputExistsError, match="c00"):
        again(options=SamplingOptions(samples=3), save_samples=True)
    # fewer samples with --force: the earlier run's sample03..05 would be scored otherwise
    again(options=SamplingOptions(samples=3), save_samples=True, force=True)
    assert sorted(p.name for p in out.glob("c00_sample*")) == [
        f"c00_sample{j:02d}.png" for j in range(3)
    ]
    # maps without samples: every sample and the soft mask go, the maps stay
    again(options=SamplingOptions(samples=3), uncertainty=True, force=True)
    assert not list(out.glob("c00_sample*")) and not list(out.glob("c00_probabilities*"))
    assert (out / "c00_variance.png").exists()


def test_cli_refuses_shortcut_for_a_model_without_jumps(tmp_path, capsys):
    from conftest import make_nnunet_dataset, train_flags

    from medflow.cli import main

    data = make_nnunet_dataset(tmp_path / "ds", n_train=2, n_test=1)
    run = tmp_path / "run"
    flags = train_flags(steps=2, val_every=2, shortcut_fraction=0)
    assert main(["train", "--data", str(data), "--out", str(run), *flags]) == 0
    assert not Predictor(run / "checkpoint_final.pt", "cpu").posterior
    capsys.readouterr()
    argv = ["predict", "--model", str(run / "checkpoint_final.pt"), "--input"]
    argv += [str(data / "imagesTs"), "--out", str(tmp_path / "p"), "--sampler", "shortcut"]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs a model trained with shortcut jumps" in err
    assert not (tmp_path / "p").exists()


def test_mc_dropout_unet_draws_differ_and_a_plain_unet_draws_once():
    from medflow.models.unet import NetConfig, SegNet
    from medflow.segmentation.inference import unet_probs

    images = torch.randn(3, 1, 8, 8)
    plain = SegNet(NetConfig(1, 3, channels=(8, 16), flow=False))
    assert unet_probs(plain, images, samples=4, per_sample=True).shape[0] == 1
    mc = SegNet(NetConfig(1, 3, channels=(8, 16), flow=False, dropout=0.3)).eval()
    one = unet_probs(mc, images, samples=1)  # one sample: the network as trained
    with torch.no_grad():
        assert torch.allclose(one, torch.softmax(mc(images), 1), atol=1e-6)
    draws = unet_probs(mc, images, samples=4, per_sample=True)
    assert draws.shape[0] == 4 and not torch.allclose(draws[0], draws[1])
    again = unet_probs(mc, images, samples=4, per_sample=True)
    assert torch.equal(draws, again)  # seeded: the same draws every call
    assert all(not m.training for m in mc.modules())  # dropout off again afterwards


def test_shortcut_steps_must_be_trained_jump_sizes(toy):
    from medflow.errors import OptionError

    _, _, predictor, slices = toy
    with pytest.raises(OptionError, match="steps 3: .* power of 2"):
        predictor.probs(slices, SamplingOptions(sampler="shortcut", steps=3))
    # at the distilled ODE's own step count, jumps that small were never trained: the
    # sampler takes the instantaneous field's Euler steps
    ode = predictor.probs(slices, SamplingOptions(sampler="euler", steps=8, samples=2))
    eight = predictor.probs(slices, SamplingOptions(sampler="shortcut", steps=8, samples=2))
    assert torch.equal(ode, eight)
    four = predictor.probs(slices, SamplingOptions(sampler="shortcut", steps=4, samples=2))
    assert not torch.equal(four, eight)


def test_save_samples_refuses_more_than_the_names_hold(tmp_path, capsys):
    from medflow.cli import main

    argv = ["predict", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path)]
    code = main([*argv, "--out", str(tmp_path / "p"), "--samples", "101", "--save-samples"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "at most 100 samples" in err
    assert not (tmp_path / "p").exists()
