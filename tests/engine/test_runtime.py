"""Code paths that production takes only on a GPU, run on the CPU: the bf16 autocast of
training and prediction (CUDA's policy in `runtime.AUTOCAST_DTYPES`, put in for "cpu" here),
and the channels-last (default) and compiled (opt-in) networks of `Predictor`."""

import contextlib
import csv
import functools
import warnings

import pytest
import torch
from conftest import TINY_TRAIN, make_nnunet_dataset

from medflow.engine import runtime
from medflow.models.attention import FrequencyAwareAttention
from medflow.models.unet import NetConfig, SegNet
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.predict import Predictor, SamplingOptions
from medflow.segmentation.train import train

MODELS = ("medflowseg", "unet", "diffusion")
# a sampler of a few steps per model, so that errors could build up over steps
SAMPLING = {
    "medflowseg": SamplingOptions(steps=3),
    "unet": SamplingOptions(),
    "diffusion": SamplingOptions(sampler="ddim", steps=3),
}


@contextlib.contextmanager
def cpu_bf16():
    """Training and prediction autocast to bf16 on the CPU, as they do on CUDA."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(runtime.AUTOCAST_DTYPES, "cpu", torch.bfloat16)
        yield


@contextlib.contextmanager
def conv_output_dtypes():
    """The dtype of every Conv2d output computed inside the block, in order."""
    seen: list[torch.dtype] = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.Conv2d):
            seen.append(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_autocast_is_bf16_on_cuda_and_off_on_cpu_unless_asked():
    conv, x = torch.nn.Conv2d(1, 2, 3), torch.randn(1, 1, 8, 8)
    with runtime.autocast("cpu"):
        assert conv(x).dtype == torch.float32
    with runtime.autocast(torch.device("cpu"), torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    with cpu_bf16(), runtime.autocast(torch.device("cpu")):
        assert conv(x).dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": only its settings are read
        ctx = runtime.autocast(torch.device("cuda", 0))
    assert isinstance(ctx, torch.autocast)
    assert (ctx.device, ctx.fast_dtype) == ("cuda", torch.bfloat16)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each model trained 2 steps (validating at step 2) in float32 and under CPU bf16
    autocast, from the same seed; with the conv output dtypes seen in the bf16 runs."""
    root = tmp_path_factory.mktemp("runtime")
    data = make_nnunet_dataset(root / "ds", n_test=1)
    out = {}
    for model in MODELS:
        cfg = TrainConfig(**{**TINY_TRAIN, "model": model, "steps": 2})
        fp32 = train(data, root / f"{model}_fp32", cfg, device="cpu", quiet=True)
        with cpu_bf16(), conv_output_dtypes() as seen:
            bf16 = train(data, root / f"{model}_bf16", cfg, device="cpu", quiet=True)
        out[model] = (fp32, bf16, seen)
    return data, out


def _losses(run_dir):
    with open(run_dir / "log.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("model", MODELS)
def test_training_under_cpu_bf16_autocast_runs_and_matches_float32(runs, model):
    _, out = runs
    fp32, bf16, seen = out[model]
    # the autocast branch really ran: convolutions computed in bf16 (training and validation)
    assert seen and set(seen) == {torch.bfloat16}
    # the first step sees the same weights and batch: only the precision differs
    first32, first16 = _losses(fp32.run_dir)[0], _losses(bf16.run_dir)[0]
    assert first16 == pytest.approx(first32, rel=0.03)
    assert all(torch.isfinite(torch.tensor(_losses(bf16.run_dir))))
    # autocast changes the compute, not the stored weights
    weights = torch.load(bf16.final_checkpoint, weights_only=False)["model"]
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("model", MODELS)
def test_prediction_under_cpu_bf16_autocast_matches_float32(runs, model):
    data, out = runs
    predictor = Predictor(out[model][0].final_checkpoint, "cpu")
    slices = torch.randn(3, 1, 16, 16)
    options = predictor.sampling(SAMPLING[model])
    ref = predictor.probs(slices, options)
    with cpu_bf16(), conv_output_dtypes() as seen:
        probs = predictor.probs(slices, options)
    assert set(seen) == {torch.bfloat16}
    assert probs.dtype == torch.float32 and probs.shape == ref.shape
    assert torch.allclose(probs.sum(1), torch.ones(()), atol=1e-4)
    # close on the whole; DDIM clips its estimate to [-1, 1], so a pixel at the clip can
    # flip under bf16's 3 significant digits (measured: under 1 % of pixels by > 0.05)
    diff = (probs - ref).abs()
    assert diff.mean() < 0.01 and (diff > 0.05).float().mean() < 0.02
    assert (probs.argmax(1) == ref.argmax(1)).float().mean() > 0.98


def test_channels_last_predictor_matches_and_keeps_the_plain_network(runs):
    _, out = runs
    ckpt = out["medflowseg"][0].final_checkpoint
    plain, fast = Predictor(ckpt, "cpu", channels_last=False), Predictor(ckpt, "cpu")
    assert fast.net.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.net.stem.weight.is_contiguous()
    slices, options = torch.randn(3, 1, 16, 16), plain.sampling(SamplingOptions(steps=2))
    assert torch.allclose(fast.probs(slices, options), plain.probs(slices, options), atol=1e-5)


def test_compiled_predictor_runs_faa_eagerly_and_matches(runs, monkeypatch):
    # inductor takes a minute per shape on this CPU; dynamo's own tracing, graph breaks and
    # guards are what this test is about, so compile with the eager backend
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    _, out = runs
    ckpt = out["medflowseg"][0].final_checkpoint
    plain = Predictor(ckpt, "cpu", channels_last=False)
    compiled = Predictor(ckpt, "cpu", channels_last=False, compile=True)
    assert type(compiled.net) is SegNet  # what cost counting and hooks see stays plain
    assert compiled._runner is not compiled.net
    faa = [m for m in compiled.net.modules() if isinstance(m, FrequencyAwareAttention)]
    assert faa and all("forward" in vars(m) for m in faa)  # wrapped to run eagerly
    slices, options = torch.randn(3, 1, 16, 16), plain.sampling(SamplingOptions(steps=2))
    assert torch.allclose(compiled.probs(slices, options), plain.probs(slices, options), atol=1e-5)


def test_configure_net_is_the_same_module_when_nothing_is_asked():
    net = SegNet(NetConfig(1, 3, channels=(8, 16)))
    assert runtime.configure_net(net) is net
    same = runtime.configure_net(net, channels_last=True)
    assert same is net and net.stem.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--no-channels-last"], False)])
def test_predict_command_runs_channels_last_unless_told_not_to(flag, expected, monkeypatch):
    from medflow import cli
    from medflow.segmentation import predict

    seen = {}
    monkeypatch.setattr(predict, "predict_folder", lambda *a, **kw: seen.update(kw) or [])
    argv = ["predict", "--model", "m.pt", "--input", "in", "--out", "out", "--threads", "1"]
    assert cli.main([*argv, *flag]) == 0
    assert seen["channels_last"] is expected and seen["compile"] is False


def test_configure_net_hands_the_compile_mode_and_backend_to_torch_compile(monkeypatch):
    seen = {}

    def fake_compile(module, **kwargs):
        seen.update(kwargs, module=module)
        return "compiled"

    monkeypatch.setattr(torch, "compile", fake_compile)
    net = SegNet(NetConfig(1, 3, channels=(8, 16)))
    out = runtime.configure_net(
        net, compile=True, compile_mode="reduce-overhead", compile_backend="eager"
    )
    assert out == "compiled" and seen["module"] is net
    assert (seen["mode"], seen["backend"]) == ("reduce-overhead", "eager")
    assert "forward" in vars(net.faa)  # FAA still runs eagerly, whatever the mode
    runtime.configure_net(net, compile=True)
    assert (seen["mode"], seen["backend"]) == (None, "inductor")  # torch's own defaults
