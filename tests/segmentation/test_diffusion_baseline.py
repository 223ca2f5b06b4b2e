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
from medflow.segmentation.inference import SamplingOptions, diffusion_probs
from medflow.segmentation.methods import Diffusion, MedFlowSeg, UNet
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

    seen = []

    from medflow.segmentation.methods import Method

    real = Method.resolve

    def spy(self, options):
        resolved = real(self, options)
        seen.append((self.name, resolved.sampler, resolved.steps))
        return resolved

    monkeypatch.setattr(Method, "resolve", spy)
    train(tiny_dataset, tmp_path / "d", TrainConfig(model="diffusion", steps=2, **TINY), quiet=True)
    train(tiny_dataset, tmp_path / "f", TrainConfig(steps=2, **TINY), quiet=True)
    # the flow model keeps one Euler step
    # (validation and the post-processing choice both predict the validation slices)
    assert set(seen) == {("diffusion", "ddim", 10), ("medflowseg-shortcut", "euler", 1)}


@pytest.mark.parametrize(
    "sampler,steps,samples", [("ddim", 10, 2), ("ddim", 50, 1), ("ddpm", 7, 3)]
)
def test_prediction_counts_steps_times_samples_and_gives_probabilities(
    diffusion_run, sampler, steps, samples
):
    data, result = diffusion_run
    predictor = Predictor(result.final_checkpoint, device="cpu")
    assert predictor.method.name == "diffusion"
    calls = count_calls(predictor.net)
    images = torch.randn(5, 1, 16, 16)
    probs = predictor.probs(images, SamplingOptions(sampler=sampler, steps=steps, samples=samples))
    assert len(calls) == steps * samples and set(calls) == {5}
    assert probs.shape == (5, 3, 16, 16) and probs.dtype == torch.float32
    assert torch.all(probs >= 0)
    assert torch.allclose(probs.sum(1), torch.ones(5, 16, 16), atol=1e-5)


def test_ddpm_1000_steps_on_a_tiny_net():
    net = SegNet(NetConfig(in_channels=1, num_classes=2, channels=(4, 8), dbsa=False, faa=False))
    calls = count_calls(net)
    probs = diffusion_probs(net, torch.randn(2, 1, 8, 8), sampler="ddpm", steps=1000)
    assert len(calls) == 1000
    assert torch.allclose(probs.sum(1), torch.ones(2, 8, 8), atol=1e-5)


def test_ensembles_average_the_samples_probabilities(diffusion_run):
    _, result = diffusion_run
    net = Predictor(result.final_checkpoint, device="cpu").net
    images = torch.randn(3, 1, 16, 16)
    kw = dict(sampler="ddim", steps=10)
    pair = diffusion_probs(net, images, samples=2, seed=4, **kw)
    first = diffusion_probs(net, images, samples=1, seed=4, **kw)
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
    kw = dict(sampler="ddpm", steps=20, samples=2)
    whole = diffusion_probs(net, images, seed=3, batch_size=32, **kw)
    halves = diffusion_probs(net, images, seed=3, batch_size=2, **kw)
    assert torch.allclose(whole, halves, atol=1e-6)
    assert not torch.allclose(whole, diffusion_probs(net, images, seed=4, **kw), atol=1e-3)


def test_samplers_that_do_not_fit_the_model_are_refused(diffusion_run):
    _, result = diffusion_run
    predictor = Predictor(result.final_checkpoint, device="cpu")
    images = torch.randn(1, 1, 16, 16)
    for sampler in ("euler", "heun", "shortcut"):
        with pytest.raises(OptionError, match=f"sampler '{sampler}' does not fit a diffusion"):
            predictor.probs(images, SamplingOptions(sampler=sampler))
    with pytest.raises(ValueError, match="steps 1001: a diffusion model has 1000 steps"):
        predictor.probs(images, SamplingOptions(sampler="ddim", steps=1001))
    flow, unet = MedFlowSeg(TrainConfig(shortcut_fraction=0)), UNet(TrainConfig(model="unet"))
    with pytest.raises(OptionError, match="'ddim' is for diffusion models; this flow model takes"):
        flow.resolve(SamplingOptions(sampler="ddim"))
    with pytest.raises(OptionError, match="'ddpm' is for diffusion models; this UNet model"):
        unet.resolve(SamplingOptions(sampler="ddpm"))
    with pytest.raises(OptionError, match="'shortcut' needs a model trained with shortcut"):
        flow.resolve(SamplingOptions(sampler="shortcut"))


def test_checkpoint_round_trip_predicts_the_same(diffusion_run, tmp_path):
    data, result = diffusion_run
    ckpt = load_checkpoint(result.final_checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"])
    assert cfg.model == "diffusion" and cfg.parameterization == "epsilon"
    predictor = Predictor(result.final_checkpoint, device="cpu")
    for name, tensor in ckpt["model"].items():
        assert torch.equal(predictor.net.state_dict()[name], tensor), name
    images = torch.randn(2, 1, 16, 16)
    kw = dict(sampler="ddim", steps=10, seed=1)
    again = Predictor(result.final_checkpoint, device="cpu")
    assert torch.equal(
        diffusion_probs(predictor.net, images, **kw), diffusion_probs(again.net, images, **kw)
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

    data, result = diffusion_run
    args = ["predict", "--model", str(result.final_checkpoint), "--input", str(data / "imagesTs")]
    assert main([*args, "--out", str(tmp_path / "auto"), "--quiet"]) == 0
    assert main([*args, "--out", str(tmp_path / "d50"), "--sampler", "ddim", "--steps", "50",
                 "--quiet"]) == 0  # fmt: skip
    for case in ("case04.nii.gz", "case05.nii.gz"):
        auto = np.asarray(nib.load(str(tmp_path / "auto" / case)).dataobj)
        assert np.array_equal(auto, np.asarray(nib.load(str(tmp_path / "d50" / case)).dataobj))
    assert Diffusion.default_steps["ddim"] == 50
    flow = MedFlowSeg(TrainConfig()).resolve(SamplingOptions())
    assert (flow.sampler, flow.steps) == ("euler", 1)
    diffusion = Diffusion(TrainConfig(model="diffusion"))
    assert diffusion.resolve(SamplingOptions(sampler="ddpm")).steps == 1000
    assert diffusion.resolve(SamplingOptions(steps=7)) == SamplingOptions(sampler="ddim", steps=7)
