"""Methods as classes: one place picks the class from a config, checkpoints name it, and each
method answers for its own network, samplers and defaults."""

import pytest
import torch
from conftest import TINY_TRAIN

from medflow.engine.checkpoint import load_checkpoint, save_checkpoint
from medflow.errors import DataError, OptionError
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.inference import SamplingOptions
from medflow.segmentation.methods import (
    Diffusion,
    MedFlowSeg,
    ShortcutMedFlowSeg,
    UNet,
    method_for,
    method_from_checkpoint,
)
from medflow.segmentation.predict import Predictor
from medflow.segmentation.train import train


@pytest.mark.parametrize(
    ("fields", "cls"),
    [
        ({}, ShortcutMedFlowSeg),  # the default trains shortcut jumps
        ({"shortcut_fraction": 0.0}, MedFlowSeg),
        ({"parameterization": "velocity", "seg_weight": 0.0}, MedFlowSeg),
        ({"model": "unet"}, UNet),
        ({"model": "diffusion"}, Diffusion),
    ],
)
def test_the_config_picks_one_class_and_its_network(fields, cls):
    method = method_for(TrainConfig(**fields))
    assert type(method) is cls
    net = method.net_config(1, 3)
    assert net.flow == (cls is not UNet)
    assert net.step_input == (cls is ShortcutMedFlowSeg)


def test_each_method_fills_its_own_defaults_and_refuses_what_it_cannot_run():
    auto = SamplingOptions()
    unet, flow = method_for(TrainConfig(model="unet")), method_for(TrainConfig(shortcut_fraction=0))
    diffusion, shortcut = method_for(TrainConfig(model="diffusion")), method_for(TrainConfig())
    assert (unet.resolve(auto).sampler, unet.resolve(auto).steps) == ("euler", 1)
    assert (diffusion.resolve(auto).sampler, diffusion.resolve(auto).steps) == ("ddim", 50)
    assert diffusion.resolve(SamplingOptions(sampler="ddpm")).steps == 1000
    # the shortcut model's mask is the one-step posterior mean; its samples are jumps
    asked = SamplingOptions(samples=4, steps=2)
    mask = shortcut.mask_options(asked)
    assert (mask.sampler, mask.steps, mask.samples) == ("euler", 1, 1)
    drawn, separate = shortcut.sample_options(asked)
    assert (drawn.sampler, drawn.steps, drawn.samples, separate) == ("shortcut", 2, 4, True)
    assert flow.sample_options(asked) == (flow.resolve(asked), False)
    with pytest.raises(OptionError, match="power of 2"):
        shortcut.resolve(SamplingOptions(sampler="shortcut", steps=3))
    with pytest.raises(OptionError, match="needs a model trained with shortcut jumps"):
        flow.resolve(SamplingOptions(sampler="shortcut"))
    assert not unet.stochastic(unet.net_config(1, 3))
    assert method_for(TrainConfig(model="unet", dropout=0.2)).stochastic(
        method_for(TrainConfig(model="unet", dropout=0.2)).net_config(1, 3)
    )


def test_a_checkpoint_names_its_method_and_a_wrong_name_is_refused(tiny_dataset, tmp_path):
    cfg = TrainConfig(model="unet", steps=2, **TINY_TRAIN)
    result = train(tiny_dataset, tmp_path / "run", cfg, quiet=True)
    ckpt = load_checkpoint(result.final_checkpoint)
    assert ckpt["method"] == "unet"
    assert isinstance(method_from_checkpoint(ckpt), UNet)
    images = torch.randn(2, 1, 16, 16)
    predictor = Predictor(result.final_checkpoint, device="cpu")
    assert torch.equal(
        predictor.probs(images, SamplingOptions()),
        torch.softmax(predictor.net.eval()(images), 1),
    )
    for name, message in (("nonsense", "unknown method 'nonsense'"), ("diffusion", "match")):
        save_checkpoint(tmp_path / f"{name}.pt", {**ckpt, "method": name})
        with pytest.raises(DataError, match=message):
            Predictor(tmp_path / f"{name}.pt", device="cpu")
