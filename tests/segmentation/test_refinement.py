"""Refinement that pays: self-conditioning (the network reads its previous endpoint
estimate), recycling (states built from its own one-step estimate) and the refine sampler
(the one-step estimate re-noised to t0, then Euler to 1)."""

import pytest
import torch
from conftest import TINY_TRAIN

from medflow.errors import OptionError
from medflow.flows.parameterization import FlowField
from medflow.flows.samplers import euler, heun
from medflow.models.unet import NetConfig, SegNet
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.cost import inference_cost
from medflow.segmentation.inference import SamplingOptions, flow_probs
from medflow.segmentation.methods import TrainBatch, method_for
from medflow.segmentation.predict import Predictor
from medflow.segmentation.train import train

K = 3


def self_conditioned(**fields) -> SegNet:
    return SegNet(NetConfig(1, K, channels=(8, 16), self_condition=True, **fields))


class Calls:
    """Forward calls of a network: the rows, whether gradients were on, and the arguments."""

    def __init__(self, net: SegNet) -> None:
        self.seen: list[dict] = []
        net.register_forward_pre_hook(self._before, with_kwargs=True)
        net.register_forward_hook(self._after)

    def _before(self, module, args, kwargs):
        est = kwargs.get("estimate")
        self.seen.append(
            {
                "rows": args[0].shape[0],
                "grad": torch.is_grad_enabled(),
                "x": args[0].detach().clone(),
                "t": args[1].detach().clone(),
                "estimate": None if est is None else est.detach().clone(),
            }
        )

    def _after(self, module, args, out):
        self.seen[-1]["probs"] = torch.softmax(out.detach().float(), dim=1)


def test_the_network_reads_the_estimate_and_none_is_zeros():
    net = self_conditioned().eval()
    assert net.stem.in_channels == 1 + 2 * K
    x, t, image = torch.randn(2, K, 16, 16), torch.rand(2), torch.randn(2, 1, 16, 16)
    est = torch.softmax(torch.randn(2, K, 16, 16), dim=1)
    with torch.no_grad():
        none = net(x, t, image)
        assert torch.equal(none, net(x, t, image, estimate=torch.zeros_like(est)))
        assert (net(x, t, image, estimate=est) - none).abs().max() > 1e-4
    plain = SegNet(NetConfig(1, K, channels=(8, 16)))
    assert plain.stem.in_channels == 1 + K  # without the field the stem is as before
    with pytest.raises(ValueError, match="reads no estimate"):
        plain(x, t, image, estimate=est)
    with pytest.raises(ValueError, match="needs a flow network"):
        NetConfig(1, K, flow=False, self_condition=True)


@pytest.mark.parametrize("solver", [euler, heun])
def test_each_step_reads_the_estimate_of_the_step_before_and_one_step_reads_none(solver):
    net = self_conditioned().eval()
    calls = Calls(net)
    field = FlowField(net)
    image, x0 = torch.randn(2, 1, 16, 16), torch.randn(2, K, 16, 16)
    solver(field, x0, field.condition(image), 3)
    assert calls.seen[0]["estimate"] is None
    for before, now in zip(calls.seen, calls.seen[1:]):
        assert torch.equal(now["estimate"], before["probs"])
    calls.seen.clear()
    euler(field, x0, field.condition(image), 1)
    assert len(calls.seen) == 1 and calls.seen[0]["estimate"] is None


def test_samples_of_one_batch_do_not_share_an_estimate():
    # the features are computed once per batch for every sample; the estimate must not be
    net = self_conditioned().eval()
    images = torch.randn(3, 1, 16, 16)
    both = flow_probs(net, images, steps=3, samples=2, seed=4, per_sample=True)
    for j in range(2):
        alone = flow_probs(net, images, steps=3, samples=1, seed=4 + j)
        assert torch.allclose(both[j], alone, atol=1e-6)


def batch_of(net: SegNet, n: int = 8, seed: int = 0) -> TrainBatch:
    gen = torch.Generator().manual_seed(seed)
    masks = torch.randint(K, (n, 16, 16), generator=gen)
    images = torch.randn(n, 1, 16, 16, generator=gen)
    return TrainBatch(images, masks, net, net, gen, slice(0, n))


def test_self_conditioned_training_reads_a_detached_first_pass_on_about_half_the_rows():
    method = method_for(TrainConfig(shortcut_fraction=0.0, self_condition=True, **TINY_TRAIN))
    net = SegNet(method.net_config(1, K)).train()
    calls = Calls(net)
    method.loss(batch_of(net, n=16)).total.backward()
    first, trained = calls.seen
    assert not first["grad"] and trained["grad"]
    assert 0 < first["rows"] < 16 and trained["rows"] == 16
    assert first["estimate"] is None
    est = trained["estimate"]
    used = est.flatten(1).abs().sum(1) > 0
    assert int(used.sum()) == first["rows"]
    assert torch.allclose(est[used], first["probs"])  # the first pass's estimate, as it gave it
    assert torch.equal(est[~used], torch.zeros_like(est[~used]))
    assert net.stem.weight.grad[:, -K:].abs().sum() > 0  # the trained pass learns to read it
    # without the field: one network call, no estimate
    plain = method_for(TrainConfig(shortcut_fraction=0.0, **TINY_TRAIN))
    net = SegNet(plain.net_config(1, K))
    calls = Calls(net)
    plain.loss(batch_of(net))
    assert len(calls.seen) == 1 and calls.seen[0]["estimate"] is None


def test_a_jump_target_starts_from_the_estimate_the_trained_pass_read():
    cfg = TrainConfig(shortcut_fraction=0.5, self_condition=True, **TINY_TRAIN)
    method = method_for(cfg)
    net = SegNet(method.net_config(1, K)).train()
    calls = Calls(net)
    terms = method.loss(batch_of(net, n=16, seed=3))
    assert float(terms.shortcut.detach()) > 0
    trained = next(c for c in calls.seen if c["grad"])
    targets = calls.seen[calls.seen.index(trained) + 1 :]  # two half-jumps, no gradient
    assert len(targets) == 2 and not any(c["grad"] for c in targets)
    jump_rows = targets[0]["rows"]
    assert torch.equal(targets[0]["estimate"], trained["estimate"][-jump_rows:])
    assert torch.equal(targets[1]["estimate"], targets[0]["probs"])


def test_recycled_rows_are_built_from_the_one_step_estimate():
    cfg = TrainConfig(shortcut_fraction=0.0, recycle_fraction=1.0, **TINY_TRAIN)
    method = method_for(cfg)
    net = SegNet(method.net_config(1, K)).train()
    calls = Calls(net)
    method.loss(batch_of(net, n=16)).total.backward()
    first, trained = calls.seen
    assert not first["grad"] and torch.equal(first["t"], torch.zeros_like(first["t"]))
    moving = trained["t"] > 0
    assert int(moving.sum()) == first["rows"]  # every row at t > 0, none at t = 0
    tt = trained["t"][moving].view(-1, 1, 1, 1)
    x0 = first["x"]
    assert torch.allclose(trained["x"][moving], (1 - tt) * x0 + tt * (2 * first["probs"] - 1))


def test_configs_refuse_what_they_cannot_train_and_old_ones_read_as_before():
    for fields in ({"model": "unet"}, {"model": "diffusion"}):
        for extra in ({"self_condition": True}, {"recycle_fraction": 0.5}):
            with pytest.raises(ValueError, match="need model medflowseg"):
                TrainConfig(**fields, **extra)
    with pytest.raises(ValueError, match="recycle_fraction must be in"):
        TrainConfig(recycle_fraction=1.5)
    stored = TrainConfig().to_dict()
    del stored["self_condition"], stored["recycle_fraction"]
    old = TrainConfig.from_dict(stored)
    assert not old.self_condition and old.recycle_fraction == 0.0
    net = dict(in_channels=1, num_classes=K, channels=[8, 16])  # a pre-field NetConfig
    assert not NetConfig.from_dict(net).self_condition


def test_flow_methods_take_refine_and_the_others_refuse_it():
    flow, unet = method_for(TrainConfig()), method_for(TrainConfig(model="unet"))
    o = flow.resolve(SamplingOptions(sampler="refine"))
    assert (o.sampler, o.steps, o.refine_start) == ("refine", 2, 0.5)
    assert method_for(TrainConfig(shortcut_fraction=0)).resolve(o) == o
    with pytest.raises(OptionError, match="unknown sampler 'refine'"):
        unet.resolve(SamplingOptions(sampler="refine"))
    with pytest.raises(OptionError, match="does not fit a diffusion model"):
        method_for(TrainConfig(model="diffusion")).resolve(SamplingOptions(sampler="refine"))
    with pytest.raises(ValueError, match="refine_start must be in"):
        SamplingOptions(refine_start=0.0)


def test_a_trained_self_conditioned_checkpoint_predicts_in_the_evaluations_asked(
    tiny_dataset, tmp_path
):
    fields = {**TINY_TRAIN, "steps": 2, "self_condition": True, "recycle_fraction": 0.5}
    result = train(tiny_dataset, tmp_path / "run", TrainConfig(**fields), quiet=True)
    predictor = Predictor(result.final_checkpoint, device="cpu")
    assert predictor.net_cfg.self_condition
    method, net = predictor.method, predictor.net
    for options, calls in (
        (SamplingOptions(), 1),  # one step, one evaluation
        (SamplingOptions(sampler="refine", steps=4), 4),
        (SamplingOptions(sampler="euler", steps=3), 3),
    ):
        assert inference_cost(method, net, 16, options).evaluations == calls
    images = torch.randn(2, 1, 16, 16)
    one = predictor.probs(images, SamplingOptions(sampler="euler", steps=1))
    at_1 = predictor.probs(images, SamplingOptions(sampler="refine", steps=3, refine_start=1.0))
    assert torch.equal(at_1, one)  # re-noised at t0 = 1, refinement keeps the estimate
    refined = predictor.probs(images, SamplingOptions(sampler="refine", steps=3))
    assert (refined - one).abs().max() > 1e-4
