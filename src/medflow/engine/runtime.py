"""Device, threads and mixed precision, decided in one place."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

from medflow.engine.distributed import Ranks
from medflow.errors import MedflowError

T = TypeVar("T")


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; an explicit device must exist.

    Under torchrun, ``auto`` and ``cuda`` without an index mean this process's own GPU,
    ``cuda:LOCAL_RANK``, so that N processes on a machine use N GPUs.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MedflowError(f"--device {name!r}: not a device name (try auto, cpu, cuda)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedflowError(
            f"--device {name!r}: CUDA is not available on this machine; use --device auto or cpu"
        )
    ranks = Ranks.from_env()
    if device.type == "cuda" and device.index is None and ranks.active:
        if ranks.local_rank >= torch.cuda.device_count():
            raise MedflowError(
                f"local rank {ranks.local_rank} has no GPU of its own: this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes per node"
            )
        device = torch.device("cuda", ranks.local_rank)
    return device


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: ``None`` means the available cores shared out between
    the processes of this run on this machine (under torchrun ``LOCAL_WORLD_SIZE`` of
    them, at least one thread each; otherwise all cores).

    Measured on the 2-vCPU CI machine (docs/PERFORMANCE.md): a training step of the default
    network at batch 16 and 96 x 96 runs 1.8x faster on two threads than on one, so all
    cores is the default for one process; tests pin one thread themselves. More threads in
    all than cores would make the processes preempt each other.
    """
    if threads is None:
        cores = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
        threads = max(1, cores // Ranks.from_env().local_world)
    if threads < 1:
        raise MedflowError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


# mixed precision per device type: bf16 on CUDA (tensor cores, no loss scaling needed); none
# on CPU, where this machine's CPUs have no bf16 units and autocast only adds casts. Tests put
# "cpu" in to run the CUDA-only autocast path on a CPU (tests/segmentation/test_runtime.py).
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"cuda": torch.bfloat16}


def autocast(
    device: torch.device | str, dtype: torch.dtype | None = None
) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type; ``dtype=None`` takes the device type's
    entry of :data:`AUTOCAST_DTYPES` (full precision where it has none)."""
    device_type = torch.device(device).type
    dtype = AUTOCAST_DTYPES.get(device_type) if dtype is None else dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def configure_net(
    net: torch.nn.Module,
    *,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
) -> torch.nn.Module:
    """``net`` set up to run faster, maybe: weights in ``channels_last`` memory format (in
    place: the convolutions then return channels-last activations whatever the input's
    layout) and/or wrapped by ``torch.compile`` (the first call of every new input shape
    compiles, a minute for MedFlowSeg on a 2-core CPU). Both off unless asked for here;
    :class:`~medflow.segmentation.predict.Predictor` asks for channels-last by default.
    What they gain is measured by benchmarks/speed.py, which sets up its networks with
    this function too.

    Inductor (torch 2.13, CPU) fails on FAA's complex FFT arithmetic ("self.stride(-1) must
    be 1 to view ComplexFloat as Float"; like pytorch#167265), so FAA modules run eagerly
    inside the compiled network, one graph break each. The compiled module shares ``net``'s
    parameters and forwards its attributes. ``compile_mode`` and ``compile_backend`` go to
    ``torch.compile`` (``"reduce-overhead"``: inductor replays CUDA graphs; benchmarks/gpu.py
    measures it).
    """
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if not compile:
        return net
    from medflow.models.attention import FrequencyAwareAttention

    for module in net.modules():
        if isinstance(module, FrequencyAwareAttention):
            module.forward = torch.compiler.disable(module.forward)
    return torch.compile(net, mode=compile_mode, backend=compile_backend)


def cuda_graph(fn: Callable[[], T], warmup: int = 3) -> Callable[[], T]:
    """``fn`` captured once in a CUDA graph; the returned function replays it and returns
    ``fn``'s output tensors, overwritten in place by each replay. What ``fn`` reads (its
    inputs, its weights) is read from the same memory at every replay: copy new data into
    the captured inputs to compute on it.

    ``fn`` must be capturable: no host synchronisation, no new shapes. Under autocast its
    weights must not require grad (autocast caches the casts of such leaves, and a cached
    cast would outlive the capture). The warm-up calls run on a side stream first, as
    capture requires: cuDNN picks its algorithms and the allocator settles there.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> T:
        graph.replay()
        return out

    return replay


def progress(iterable=None, *, quiet: bool = False, **kwargs):
    """A tqdm bar on an interactive terminal; silent under ``--quiet`` or when stderr is a
    file or pipe (logs and CI), where redrawn bars only add noise."""
    from tqdm import tqdm

    return tqdm(iterable, disable=quiet or not sys.stderr.isatty(), **kwargs)


def machine_info() -> dict:
    """What a benchmark result was measured on: CPU, cores available, Python, torch, GPU."""
    import platform

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else (os.cpu_count() or 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
