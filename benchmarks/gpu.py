"""One-step MedFlowSeg throughput on a GPU: eager, torch.compile and CUDA graphs over a batch
sweep, with the plain UNet of the same backbone in the same run as the baseline.

Each model is the method's one-call predictor, ``Method.export_module`` (what ``medflow
export`` writes): MedFlowSeg's ``OneStepFlow`` (image, noise -> probabilities: the image
features, one network call at ``t = 0``, the probabilities) for the default ``TrainConfig``
network, and the UNet's ``UNetProbs`` (image -> softmax). Both run under bf16 autocast
(``runtime.autocast``'s CUDA policy), channels-last (``medflow predict``'s default), with
weights that need no grad, on inputs already on the device; outputs stay there (the host
copies of ``medflow predict`` are not timed). Set-ups (:data:`MODES`):

* ``eager``: the predictor in eager PyTorch;
* ``cuda-graph``: the eager predictor captured in a CUDA graph per batch size
  (``runtime.cuda_graph``) and replayed: no launch overhead, the same kernels;
* ``compile``: the network compiled by inductor (``runtime.configure_net``, FAA eager
  inside as in ``medflow predict --compile``); torch recompiles once for a second batch
  size and then treats the batch as dynamic;
* ``compile-cudagraphs``: the same with ``mode="reduce-overhead"`` (inductor's CUDA graphs).

For every model, set-up and batch size (1, 8, 32, 128, 256 at 256 x 256) it times the first
call apart (compilation, capture), warms up, then takes the median over rounds of the mean
time per call of a block of back-to-back calls, synchronised at the block's ends:
``slices_per_s = batch / seconds_per_call``. At batch 1 it also takes the latency, the median
of single synchronised calls. A set-up that fails (out of memory, a capture error) is a row
with its error, not the end of the run; one not started before ``--budget-s`` is a skipped
row. The goal it reports against (issue 15): >= 2000 slices/s one-step at 256 x 256 on an
H100-class GPU.

    python benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--budget-s 300]
    python benchmarks/gpu.py --cpu-smoke --out /tmp/gpu.json   # tiny, CPU, seconds

``--cpu-smoke`` runs the same loop on the CPU at 32 x 32 with tiny networks, compiling with
dynamo's eager backend (inductor would take a minute here); the CUDA-only set-ups become
skipped rows. It checks the plumbing, not speed. ``benchmarks/gpu.sh`` runs the CUDA tests
and then this script on a GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from medflow.engine import runtime
from medflow.models.unet import SegNet, count_parameters
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.methods import method_for

GOAL_SLICES_PER_S = 2000.0


@dataclass(frozen=True)
class Mode:
    """One way of running a predictor.

    Attributes:
        name: its label in the results.
        compile_mode: ``torch.compile``'s mode (None: not compiled).
        graph: captured in a CUDA graph by ``runtime.cuda_graph``.
        cuda_only: runs on CUDA alone (a skipped row elsewhere).
    """

    name: str
    compile_mode: str | None = None
    graph: bool = False
    cuda_only: bool = False


MODES = [
    Mode("eager"),
    Mode("cuda-graph", graph=True, cuda_only=True),
    Mode("compile", compile_mode="default"),
    Mode("compile-cudagraphs", compile_mode="reduce-overhead", cuda_only=True),
]


@dataclass(frozen=True)
class GpuBenchConfig:
    """What to measure. Defaults: the GPU run; :meth:`cpu_smoke`: the tiny CPU run."""

    size: int = 256
    batches: tuple[int, ...] = (1, 8, 32, 128, 256)
    models: tuple[str, ...] = ("medflowseg", "unet")
    modes: tuple[str, ...] = tuple(m.name for m in MODES)
    channels: tuple[int, ...] = TrainConfig.channels
    num_classes: int = 3
    seconds: float = 0.25  # timed seconds per round (and of warm-up)
    rounds: int = 3
    latency_calls: int = 50
    budget_s: float = 300.0  # no set-up is started later than this after the start
    compile_backend: str = "inductor"
    device: str = "cuda"

    @classmethod
    def cpu_smoke(cls) -> GpuBenchConfig:
        return cls(
            size=32,
            batches=(1, 4),
            channels=(8, 16),
            seconds=0.01,
            rounds=2,
            latency_calls=3,
            budget_s=120.0,
            compile_backend="eager",
            device="cpu",
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call(call: Callable[[], object], n: int, device: torch.device) -> float:
    """Mean seconds per call of ``n`` back-to-back calls, synchronised at both ends."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    _sync(device)
    return (time.perf_counter() - t0) / n


def _predictor(model: str, mode: Mode, cfg: GpuBenchConfig, device: torch.device):
    """A fresh network of ``model`` set up for ``mode``: its one-call predictor, the names
    of its inputs, and what the rows record of it (the method's name, the parameters)."""
    torch.manual_seed(0)
    method = method_for(TrainConfig(model=model, channels=cfg.channels))
    # the method's own network (train.build_net does the same; train's data imports are not
    # needed here, and a bare GPU image may lack them)
    net = SegNet(method.net_config(1, cfg.num_classes)).to(device).eval().requires_grad_(False)
    if mode.compile_mode is not None:
        torch._dynamo.reset()  # compiled code of earlier set-ups must not count against limits
    run = runtime.configure_net(
        net,
        channels_last=True,
        compile=mode.compile_mode is not None,
        compile_mode=mode.compile_mode,
        compile_backend=cfg.compile_backend,
    )
    predictor, names = method.export_module(run)
    return predictor, names, {"method": method.name, "parameters": count_parameters(net)}


def _call(predictor, names, batch: int, mode: Mode, cfg: GpuBenchConfig, device):
    """A no-argument function running ``predictor`` once on a batch of ``batch`` slices."""
    gen = torch.Generator(device=device).manual_seed(batch)
    channels = {"image": 1, "noise": cfg.num_classes}
    inputs = [
        torch.randn(batch, channels[n], cfg.size, cfg.size, generator=gen, device=device)
        for n in names
    ]

    def once():
        if mode.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new inference step
        with torch.no_grad(), runtime.autocast(device):
            return predictor(*inputs)

    return runtime.cuda_graph(once) if mode.graph else once


def measure(call, batch: int, cfg: GpuBenchConfig, device: torch.device) -> dict:
    """Timings of ``call`` (already set up) on ``batch`` slices: see the module docstring."""
    single = _per_call(call, 1, device)
    n = max(3, min(1000, math.ceil(cfg.seconds / max(single, 1e-6))))
    _per_call(call, n, device)  # warm-up: clocks, caches, the allocator
    rounds = [_per_call(call, n, device) for _ in range(cfg.rounds)]
    seconds = statistics.median(rounds)
    row = {
        "calls_per_round": n,
        "rounds_s": rounds,
        "seconds_per_call": seconds,
        "slices_per_s": batch / seconds,
        "latency_ms": None,
    }
    if batch == 1:
        singles = [_per_call(call, 1, device) for _ in range(cfg.latency_calls)]
        row["latency_ms"] = 1000.0 * statistics.median(singles)
    return row


def _arm(model: str, mode: Mode, cfg: GpuBenchConfig, device, deadline: float) -> list[dict]:
    """Rows of one model in one set-up, every batch size."""
    rows = [{"model": model, "mode": mode.name, "batch": b, "status": "ok"} for b in cfg.batches]
    if mode.cuda_only and device.type != "cuda":
        return [{**r, "status": "skipped", "reason": "needs CUDA"} for r in rows]
    if time.perf_counter() > deadline:
        return [{**r, "status": "skipped", "reason": "time budget (--budget-s)"} for r in rows]
    try:
        predictor, names, about = _predictor(model, mode, cfg, device)
    except Exception as exc:  # a set-up that cannot be built is reported, not fatal
        return [{**r, "status": "error", "error": _error(exc)} for r in rows]
    rows = [{**r, **about} for r in rows]
    for row in rows:
        if time.perf_counter() > deadline:
            row.update(status="skipped", reason="time budget (--budget-s)")
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous batch's graph pool and activations
            torch.cuda.reset_peak_memory_stats(device)
        try:
            t0 = time.perf_counter()
            call = _call(predictor, names, row["batch"], mode, cfg, device)
            call()  # compiles a compiled set-up (a second batch size recompiles once)
            _sync(device)
            row["setup_s"] = time.perf_counter() - t0
            row.update(measure(call, row["batch"], cfg, device))
            if device.type == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        except Exception as exc:  # out of memory, a capture error: a row, not the end
            row.update(status="error", error=_error(exc))
        finally:
            call = None  # a captured graph holds its memory pool until dropped
        print(f"{model} {mode.name} b{row['batch']}: {_cell(row)}", file=sys.stderr, flush=True)
    return rows


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:400]}"


def summarise(rows: list[dict], cfg: GpuBenchConfig, device: torch.device) -> dict:
    """Flow / UNet time per call for every set-up and batch both measured, and the best
    MedFlowSeg throughput against the goal."""
    ok = {(r["model"], r["mode"], r["batch"]): r for r in rows if r["status"] == "ok"}
    ratios = []
    for (model, mode, batch), flow in ok.items():
        unet = ok.get(("unet", mode, batch))
        if model == "medflowseg" and unet is not None:
            ratio = flow["seconds_per_call"] / unet["seconds_per_call"]
            ratios.append({"mode": mode, "batch": batch, "flow_over_unet_time": ratio})
    flows = [r for r in ok.values() if r["model"] == "medflowseg"]
    best = max(flows, key=lambda r: r["slices_per_s"], default=None)
    goal = {
        "slices_per_s": GOAL_SLICES_PER_S,
        "size": 256,
        "best": None if best is None else {k: best[k] for k in ("mode", "batch", "slices_per_s")},
        # only a GPU run at the goal's size says anything about the goal
        "met": None
        if best is None or device.type != "cuda" or cfg.size != 256
        else best["slices_per_s"] >= GOAL_SLICES_PER_S,
    }
    return {"ratios": ratios, "goal": goal}


def run(cfg: GpuBenchConfig) -> dict:
    """Every model in every set-up of ``cfg``, and the record the results file holds."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu.py: CUDA is not available here; use --cpu-smoke on a CPU")
    start = time.perf_counter()
    deadline = start + cfg.budget_s
    modes = [m for m in MODES if m.name in cfg.modes]
    rows = [r for m in modes for model in cfg.models for r in _arm(model, m, cfg, device, deadline)]
    cuda = device.type == "cuda"
    return {
        "benchmark": "gpu",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "machine": runtime.machine_info(),
        "config": dataclasses.asdict(cfg),
        "rows": rows,
        "summary": summarise(rows, cfg, device),
        "seconds": time.perf_counter() - start,
    }


def _cell(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    return f"{row['slices_per_s']:.0f}"


def markdown(record: dict) -> str:
    """Slices/s per model, set-up and batch size; latency at batch 1; flow / UNet time."""
    batches = record["config"]["batches"]
    head = " | ".join(f"b{b} slices/s" for b in batches)
    lines = [
        f"| model | set-up | {head} | b1 latency ms |",
        "|---|---|" + "---|" * len(batches) + "---|",
    ]
    keys = dict.fromkeys((r["model"], r["mode"]) for r in record["rows"])
    for model, mode in keys:
        by = {r["batch"]: r for r in record["rows"] if (r["model"], r["mode"]) == (model, mode)}
        cells = [_cell(by[b]) if b in by else "-" for b in batches]
        lat = by.get(1, {}).get("latency_ms")
        lines.append(
            f"| {model} | {mode} | {' | '.join(cells)} | {'-' if lat is None else f'{lat:.2f}'} |"
        )
    lines += ["", "| set-up | batch | MedFlowSeg / UNet time |", "|---|---|---|"]
    for r in record["summary"]["ratios"]:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['flow_over_unet_time']:.2f}x |")
    goal = record["summary"]["goal"]
    best = goal["best"]
    met = {True: "met", False: "not met", None: "not judged (no GPU run at 256 x 256)"}[goal["met"]]
    where = (
        "none measured"
        if best is None
        else f"{best['slices_per_s']:.0f} ({best['mode']}, b{best['batch']})"
    )
    lines += ["", f"best MedFlowSeg slices/s: {where}; goal {goal['slices_per_s']:.0f}: {met}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny run on the CPU")
    parser.add_argument("--budget-s", type=float, help="start no set-up after this many s")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--modes", nargs="+", choices=[m.name for m in MODES])
    args = parser.parse_args(argv)
    cfg = GpuBenchConfig.cpu_smoke() if args.cpu_smoke else GpuBenchConfig()
    picked = {"budget_s": args.budget_s, "batches": args.batches, "modes": args.modes}
    cfg = dataclasses.replace(
        cfg,
        **{k: tuple(v) if isinstance(v, list) else v for k, v in picked.items() if v is not None},
    )
    if args.cpu_smoke:
        torch.set_num_threads(1)
    record = run(cfg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record), end="")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
