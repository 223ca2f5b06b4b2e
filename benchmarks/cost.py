"""Inference cost of the MedFlowSeg network against the plain UNet of the same backbone.

Times forward passes of a batch of slices for the UNet, MedFlowSeg, and MedFlowSeg without
DBSA, without FAA and without both, all in one process under the same threads. This VM's
timings drift by 10-20 % within seconds and alternating single calls between networks
thrashes caches, so each round runs a block of consecutive calls per network, blocks in a
fresh random order every round; a network's time is the median over rounds of its block
means, reported with the interquartile range and as a ratio to the UNet's.

    python benchmarks/cost.py [--threads 1] [--batch 16] [--size 96] [--rounds 12] [--block 4]
        [--out benchmarks/results/cost.json]
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
    "unet": dict(flow=False),
    "medflowseg": {},
    "medflowseg-no-dbsa": dict(dbsa=False),
    "medflowseg-no-faa": dict(faa=False),
    "medflowseg-no-dbsa-no-faa": dict(dbsa=False, faa=False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, s = args.batch, args.size
    img, x, t = torch.randn(b, 1, s, s), torch.randn(b, 3, s, s), torch.zeros(b)
    nets = {n: SegNet(NetConfig(1, 3, **kw)).eval() for n, kw in VARIANTS.items()}

    def call(n: str) -> None:
        nets[n](img) if n == "unet" else nets[n](x, t, img)

    times: dict[str, list[float]] = {n: [] for n in nets}
    order, rng = list(nets), random.Random(0)
    with torch.inference_mode():
        for _ in range(args.rounds):
            rng.shuffle(order)
            for n in order:
                call(n)  # warm the caches for this network's block
                t0 = time.perf_counter()
                for _ in range(args.block):
                    call(n)
                times[n].append((time.perf_counter() - t0) * 1000.0 / args.block)
    base = statistics.median(times["unet"])
    rows = {}
    for n, v in times.items():
        q1, _, q3 = statistics.quantiles(v, n=4)
        rows[n] = {
            "params": count_parameters(nets[n]),
            "median_ms": statistics.median(v),
            "iqr_ms": [q1, q3],
            "ratio_to_unet": statistics.median(v) / base,
        }
    record = {
        "threads": args.threads,
        "batch": b,
        "size": s,
        "rounds": args.rounds,
        "block": args.block,
        "torch": torch.__version__,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"| network | parameters | ms per batch of {b} | IQR ms | x UNet |")
    print("|---|---|---|---|---|")
    for n, r in rows.items():
        print(
            f"| {n} | {r['params'] / 1e6:.2f} M | {r['median_ms']:.1f} | "
            f"{r['iqr_ms'][0]:.0f}-{r['iqr_ms'][1]:.0f} | {r['ratio_to_unet']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
