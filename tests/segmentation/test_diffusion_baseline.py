"""The MedSegDiff-style diffusion baseline: config, training branch, sampling dispatch."""

import csv

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, make_nnunet_dataset

from medflow.cli import main
from medflow.engine.checkpoint import load_checkpoint
from medflow.errors import OptionError
from medflow.models.unet import NetConfig, SegNet
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.inference import predict_probs
from medflow.segmentation.predict import Predictor
from medflow.segmentation.train import train

TINY = {**TINY_TRAIN, "val_every": 2, "checkpoint_every": 10}


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    data = make_nnunet_dataset(root / "ds")
    result = train(data, root / "run", TrainConfig(model="diffusion", steps=3, **TINY), quiet=True)
    return data, result


def count_calls(net):
    calls = []
    net.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


def test_diffusion_config_resolves_to_noise_prediction():
    cfg = TrainConfig(model="diffusion")
    assert cfg.parameterization == "epsilon"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="parameterization epsilon goes with model diffusion"):
        TrainConfig(parameterization="epsilon")
    with pytest.raises(ValueError, match="parameterization epsilon goes with model diffusion"):
        TrainConfig(model="diffusion", parameterization="velocity", seg_weight=0)


def test_training_logs_the_noise_loss_and_ddim_validation(diffusion_run):
    _, result = diffusion_run
    ckpt = load_checkpoint(result.final_checkpoint)
    assert ckpt["config"]["model"] == "diffusion"
    assert ckpt["config"]["parameterization"] == "epsilon"
    assert ckpt["net"]["flow"] is True  # the flow-mode backbone: (x_t, t, image)
    rows = list(csv.DictReader((result.run_dir / "log.csv").read_text().splitlines()))
    # an untrained network predicts about zero noise: squared error near Var(eps) = 1
    assert all(0.3 < float(r["flow_loss"]) < 3.0 for r in rows)
    assert all(float(r["seg_loss"]) == 0.0 and r["loss"] == r["flow_loss"] for r in rows)
    assert rows[1]["val_dice"] != "" and 0.0 <= float(rows[1]["val_dice"]) <= 1.0
    assert result.best_val_dice == max(float(r["val_dice"]) for r in rows if r["val_dice"])


def test_validation_samples_with_ddim_10(tiny_dataset, tmp_path, monkeypatch):
    import medflow.segmentation.train as train_module

    seen = []

    def spy(net, images, **kwargs):
        seen.append((kwargs.get("sampler"), kwargs.get("steps")))
        return predict_probs(net, images, **kwargs)

    monkeypatch.setattr(train_module, "predict_probs", spy)
    train(tiny_dataset, tmp_path / "d", TrainConfig(model="diffusion", steps=2, **TINY), quiet=True)
    train(tiny_dataset, tmp_path / "f", TrainConfig(steps=2, **TINY), quiet=True)
    assert seen == [("ddim", 10), (None, None)]  # the flow model keeps one Euler step


@pytest.mark.parametrize(
    "sampler,steps,samples", [("ddim", 10, 2), ("ddim", 50, 1), ("ddpm", 7, 3)]
)
def test_prediction_counts_steps_times_samples_and_gives_probabilities(
    diffusion_run, sampler, steps, samples
):
    data, result = diffusion_run
    predictor = Predictor(result.final_checkpoint, device="cpu")
    assert predictor.parameterization == "epsilon"
    calls = count_calls(predictor.net)
    images = torch.randn(5, 1, 16, 16)
    probs = predict_probs(
        predictor.net,
        images,
        sampler=sampler,
        steps=steps,
        samples=samples,
        parameterization=predictor.parameterization,
    )
    assert len(calls) == steps * samples and set(calls) == {5}
    assert probs.shape == (5, 3, 16, 16) and probs.dtype == torch.float32
    assert torch.all(probs >= 0)
    assert torch.allclose(probs.sum(1), torch.ones(5, 16, 16), atol=1e-5)


def test_ddpm_1000_steps_on_a_tiny_net():
    net = SegNet(NetConfig(in_channels=1, num_classes=2, channels=(4, 8), dbsa=False, faa=False))
    calls = count_calls(net)
    probs = predict_probs(
        net, torch.randn(2, 1, 8, 8), sampler="ddpm", steps=1000, parameterization="epsilon"
    )
    assert len(calls) == 1000
    assert torch.allclose(probs.sum(1), torch.ones(2, 8, 8), atol=1e-5)


def test_ensembles_average_the_samples_probabilities(diffusion_run):
    _, result = diffusion_run
    net = Predictor(result.final_checkpoint, device="cpu").net
    images = torch.randn(3, 1, 16, 16)
    kw = dict(sampler="ddim", steps=10, parameterization="epsilon")
    pair = predict_probs(net, images, samples=2, seed=4, **kw)
    first = predict_probs(net, images, samples=1, seed=4, **kw)
    assert not torch.allclose(pair, first)  # the second draw changed the mean
    # sample j of the pair starts from the noise of seed 4 + j
    noises = [
        torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4 + j)) for j in (0, 1)
    ]
    from medflow.flows.diffusion import EpsilonField, ddim
    from medflow.flows.encoding import flow_to_probs

    field = EpsilonField(net.eval())
    by_hand = sum(flow_to_probs(ddim(field, z, field.condition(images), 10)) for z in noises) / 2
    assert torch.allclose(pair, by_hand, atol=1e-6)
    assert torch.allclose(first, flow_to_probs(ddim(field, noises[0], field.condition(images))))


def test_ddpm_noise_follows_the_seed_not_the_batch(diffusion_run):
    _, result = diffusion_run
    net = Predictor(result.final_checkpoint, device="cpu").net
    images = torch.randn(5, 1, 16, 16)
    kw = dict(sampler="ddpm", steps=20, parameterization="epsilon", samples=2)
    whole = predict_probs(net, images, seed=3, batch_size=32, **kw)
    assert torch.allclose(whole, predict_probs(net, images, seed=3, batch_size=2, **kw), atol=1e-6)
    assert not torch.allclose(whole, predict_probs(net, images, seed=4, **kw), atol=1e-3)


def test_samplers_that_do_not_fit_the_model_are_refused(diffusion_run):
    _, result = diffusion_run
    net = Predictor(result.final_checkpoint, device="cpu").net
    images = torch.randn(1, 1, 16, 16)
    for sampler in ("euler", "heun"):
        with pytest.raises(OptionError, match=f"sampler '{sampler}' does not fit a diffusion"):
            predict_probs(net, images, sampler=sampler, parameterization="epsilon")
    with pytest.raises(ValueError, match="steps 1001: a diffusion model has 1000 steps"):
        predict_probs(net, images, sampler="ddim", steps=1001, parameterization="epsilon")
    flow = SegNet(NetConfig(in_channels=1, num_classes=3, channels=(8, 16)))
    unet = SegNet(NetConfig(in_channels=1, num_classes=3, channels=(8, 16), flow=False))
    with pytest.raises(ValueError, match="'ddim' is for diffusion models; this flow model takes"):
        predict_probs(flow, images, sampler="ddim")
    with pytest.raises(ValueError, match="'ddpm' is for diffusion models; this UNet model"):
        predict_probs(unet, images, sampler="ddpm")


def test_checkpoint_round_trip_predicts_the_same(diffusion_run, tmp_path):
    data, result = diffusion_run
    ckpt = load_checkpoint(result.final_checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"])
    assert cfg.model == "diffusion" and cfg.parameterization == "epsilon"
    predictor = Predictor(result.final_checkpoint, device="cpu")
    for name, tensor in ckpt["model"].items():
        assert torch.equal(predictor.net.state_dict()[name], tensor), name
    images = torch.randn(2, 1, 16, 16)
    kw = dict(sampler="ddim", steps=10, parameterization="epsilon", seed=1)
    again = Predictor(result.final_checkpoint, device="cpu")
    assert torch.equal(
        predict_probs(predictor.net, images, **kw), predict_probs(again.net, images, **kw)
    )


def test_cli_predicts_with_ddim_and_names_a_wrong_sampler(diffusion_run, tmp_path, capsys):
    data, result = diffusion_run
    out = tmp_path / "pred"
    args = ["predict", "--model", str(result.final_checkpoint), "--input", str(data / "imagesTs")]
    assert main([*args, "--out", str(out), "--sampler", "ddim", "--steps", "10", "--quiet"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["case04.nii.gz", "case05.nii.gz"]
    import nibabel as nib

    labels = np.asarray(nib.load(str(out / "case04.nii.gz")).dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "q"), "--sampler", "euler", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sampler 'euler' does not fit a diffusion model" in err[0]
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())


def test_predict_without_sampler_flags_takes_the_models_default(diffusion_run, tmp_path):
    """No --sampler/--steps: DDIM-50 for a diffusion checkpoint, one Euler step for a flow."""
    import nibabel as nib

    from medflow.segmentation.predict import DEFAULT_STEPS, SamplingOptions

    data, result = diffusion_run
    args = ["predict", "--model", str(result.final_checkpoint), "--input", str(data / "imagesTs")]
    assert main([*args, "--out", str(tmp_path / "auto"), "--quiet"]) == 0
    assert main([*args, "--out", str(tmp_path / "d50"), "--sampler", "ddim", "--steps", "50",
                 "--quiet"]) == 0  # fmt: skip
    for case in ("case04.nii.gz", "case05.nii.gz"):
        auto = np.asarray(nib.load(str(tmp_path / "auto" / case)).dataobj)
        assert np.array_equal(auto, np.asarray(nib.load(str(tmp_path / "d50" / case)).dataobj))
    assert DEFAULT_STEPS["ddim"] == 50
    flow = SamplingOptions().resolved(diffusion=False)
    assert (flow.sampler, flow.steps) == ("euler", 1)
    assert SamplingOptions(sampler="ddpm").resolved(diffusion=True).steps == 1000
    assert SamplingOptions(steps=7).resolved(diffusion=True) == SamplingOptions(
        sampler="ddim", steps=7
    )
