"""What only a GPU runs: prediction and training under CUDA's bf16 autocast, FAA's FFTs on
cuFFT, the one-step predictor replayed as a CUDA graph, and DDP over NCCL. Every test here
is marked ``cuda`` and skipped without a CUDA device; ``benchmarks/gpu.sh`` runs them
(``pytest -m cuda``). On the CPU, tests/engine/test_runtime.py runs the autocast code path
with the CUDA policy put in for the CPU."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medflow.engine import runtime
from medflow.models.unet import SegNet
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.inference import SamplingOptions
from medflow.segmentation.methods import TrainBatch, method_for

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

WORKER = Path(__file__).with_name("nccl_worker.py")
CLASSES, SIZE = 3, 32
# a sampler of a few steps per model, so that errors could build up over steps
SAMPLING = {
    "medflowseg": SamplingOptions(steps=3),
    "unet": SamplingOptions(),
    "diffusion": SamplingOptions(sampler="ddim", steps=3),
}


def _method_and_net(model: str, device: str = "cuda"):
    torch.manual_seed(0)
    method = method_for(TrainConfig(model=model, channels=(8, 16)))
    return method, SegNet(method.net_config(1, CLASSES)).to(device)


@pytest.fixture
def full_float32(monkeypatch):
    """No autocast on CUDA and no TF32: float32 as the CPU computes it."""
    monkeypatch.delitem(runtime.AUTOCAST_DTYPES, "cuda")
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


@contextlib.contextmanager
def conv_output_dtypes():
    """The dtypes of the Conv2d outputs computed inside the block."""
    seen: set[torch.dtype] = set()

    def hook(module, args, output):
        if isinstance(module, torch.nn.Conv2d):
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("model", SAMPLING)
def test_prediction_on_cuda_in_float32_matches_the_cpu(model, full_float32):
    method, net = _method_and_net(model)
    images = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    on_gpu = method.probs(net, images, SAMPLING[model])
    on_cpu = method.probs(net.cpu(), images, SAMPLING[model])
    assert on_gpu.device.type == "cpu"  # probabilities come back to the host
    assert torch.allclose(on_gpu, on_cpu, atol=1e-4), (on_gpu - on_cpu).abs().max()


@pytest.mark.parametrize("model", SAMPLING)
def test_prediction_under_cuda_bf16_autocast_is_close_to_float32(model, monkeypatch):
    method, net = _method_and_net(model)
    images = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with conv_output_dtypes() as seen:
        probs = method.probs(net, images, SAMPLING[model])
    assert seen == {torch.bfloat16}  # CUDA's policy: every convolution in bf16
    with monkeypatch.context() as mp:
        mp.delitem(runtime.AUTOCAST_DTYPES, "cuda")
        fp32 = method.probs(net, images, SAMPLING[model])
    assert probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(()), atol=1e-4)
    diff = (probs - fp32).abs()
    assert diff.mean() < 0.01 and (diff > 0.05).float().mean() < 0.02
    assert (probs.argmax(1) == fp32.argmax(1)).float().mean() > 0.98


def test_a_training_step_under_cuda_bf16_autocast_matches_float32(monkeypatch):
    pytest.importorskip("monai")  # the segmentation loss (DiceCE)
    method, net = _method_and_net("medflowseg")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 1, SIZE, SIZE, generator=gen).cuda()
    masks = torch.randint(CLASSES, (4, SIZE, SIZE), generator=gen).cuda()

    def loss():
        batch = TrainBatch(images, masks, net, net, torch.Generator().manual_seed(2), slice(0, 4))
        with runtime.autocast("cuda"):
            return method.loss(batch)

    with monkeypatch.context() as mp:
        mp.delitem(runtime.AUTOCAST_DTYPES, "cuda")
        fp32 = loss().total.item()
    with conv_output_dtypes() as seen:
        terms = loss()
    assert seen == {torch.bfloat16}
    terms.total.backward()
    assert terms.total.item() == pytest.approx(fp32, rel=0.03)
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


def test_the_one_step_predictor_replays_as_a_cuda_graph():
    method, net = _method_and_net("medflowseg")
    net.eval().requires_grad_(False)  # autocast caches no casts: the graph owns them all
    predictor, names = method.export_module(net)
    assert names == ("image", "noise")
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(2, c, SIZE, SIZE, generator=gen, device="cuda") for c in (1, CLASSES)]

    def once():
        with torch.no_grad(), runtime.autocast("cuda"):
            return predictor(*inputs)

    replay = runtime.cuda_graph(once)
    first = replay().clone()
    assert torch.allclose(first, once(), atol=1e-3)
    # new data copied into the captured inputs is what the next replay computes on
    for x in inputs:
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
    second = replay()
    assert not torch.allclose(second, first, atol=1e-2)
    assert torch.allclose(second, once(), atol=1e-3)


def test_ddp_over_nccl_on_one_gpu_trains_like_one_process(tmp_path):
    pytest.importorskip("monai")  # the segmentation loss (DiceCE)
    out = tmp_path / "nccl.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        + [str(WORKER), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["backend"], result["world"], result["broadcast"]) == ("nccl", 1, {"rank": 0})
    assert result["grad_dtypes"] == ["torch.float32"]  # autocast computes, weights stay fp32
    ddp, plain = (torch.tensor(result[k]) for k in ("ddp_terms", "plain_terms"))
    assert ddp.shape == (3, 4) and torch.isfinite(ddp).all()  # steps x (total, flow, seg, ...)
    # one rank: the all-reduced gradient is the gradient, so DDP is the plain step
    assert torch.allclose(ddp, plain, rtol=1e-4, atol=1e-6)
    assert result["max_weight_diff"] < 1e-4
