"""Inference time of the MedFlowSeg networks against the plain UNet of the same backbone.

One-step MedFlowSeg is one network call, so its cost against the UNet is the ratio of one
forward pass. This times, in one process under the same threads, the UNet and the MedFlowSeg
variants of the bench (v1 with both modules, the version-2 modules, neither module), the way
prediction runs them (``torch.inference_mode``, channels-last: ``Predictor``'s default), at
every batch (1: latency; 32: throughput) and size (96: the resized default; 128: the CPU
plan's patch of ``mni152-lesions``, docs/PLANNING.md) asked for.

This VM's timings drift by 10-20 % within seconds, and alternating single calls between
networks thrashes caches, so each round runs a block of consecutive calls per network, blocks
in a fresh random order every round; a network's time is the median over rounds of its block
means, reported with the interquartile range and as a ratio to the UNet's of the same batch
and size. ``--clock cpu`` (the default) times blocks in this process's CPU time
(``time.process_time``), which a busy neighbour on the machine does not inflate the way it
inflates wall time; with one thread it is the compute time of the calls. ``--clock wall``
is what a user waits on an otherwise idle machine.

    python benchmarks/cost.py [--threads 1] [--batches 1 32] [--sizes 96 128] [--rounds 8]
        [--block 3] [--out benchmarks/results/cost.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from medflow.models.unet import NetConfig, SegNet, count_parameters

VARIANTS = {
    "unet": dict(flow=False, dbsa=False, faa=False, image_branch=False),
    "medflowseg": {},
    "medflowseg-v2": dict(dbsa_version=2, faa_version=2, faa_levels=2),
    "medflowseg-dbsa-v2": dict(dbsa_version=2),
    "medflowseg-faa-v2": dict(faa_version=2, faa_levels=2),
    "medflowseg-no-both": dict(dbsa=False, faa=False),
}

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def time_networks(
    nets: dict, batch: int, size: int, rounds: int, block: int, clock=time.process_time
) -> dict:
    """Median milliseconds per call of every network at ``(batch, 1, size, size)`` inputs."""
    cl = torch.channels_last
    img = torch.randn(batch, 1, size, size).contiguous(memory_format=cl)
    x, t = torch.randn(batch, 3, size, size).contiguous(memory_format=cl), torch.zeros(batch)

    def call(n: str) -> None:
        nets[n](img) if n == "unet" else nets[n](x, t, img)

    times: dict[str, list[float]] = {n: [] for n in nets}
    order, rng = list(nets), random.Random(0)
    with torch.inference_mode():
        for _ in range(rounds):
            rng.shuffle(order)
            for n in order:
                call(n)  # warm the caches for this network's block
                t0 = clock()
                for _ in range(block):
                    call(n)
                times[n].append((clock() - t0) * 1000.0 / block)
    base = statistics.median(times["unet"])
    out = {}
    for n, v in times.items():
        q1, _, q3 = statistics.quantiles(v, n=4)
        out[n] = {
            "median_ms": statistics.median(v),
            "iqr_ms": [q1, q3],
            "ratio_to_unet": statistics.median(v) / base,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = ["unet", *(n for n in args.variants if n != "unet")]
    nets = {
        n: SegNet(NetConfig(1, 3, **VARIANTS[n])).eval().to(memory_format=torch.channels_last)
        for n in names
    }
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            timed = time_networks(nets, batch, size, args.rounds, args.block, CLOCKS[args.clock])
            rows += [{"size": size, "batch": batch, "network": n, **r} for n, r in timed.items()]
    record = {
        "threads": args.threads,
        "rounds": args.rounds,
        "block": args.block,
        "clock": args.clock,
        "memory_format": "channels_last",
        "torch": torch.__version__,
        "parameters": {n: count_parameters(net) for n, net in nets.items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    table = [
        "| size | batch | network | parameters | ms per call | IQR ms | x UNet |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['size']} | {r['batch']} | {r['network']} | "
            f"{record['parameters'][r['network']] / 1e6:.2f} M | {r['median_ms']:.1f} | "
            f"{r['iqr_ms'][0]:.1f}-{r['iqr_ms'][1]:.1f} | {r['ratio_to_unet']:.2f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
