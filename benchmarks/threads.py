"""How many intra-op threads should medflow use on this machine?

Times, for the default MedFlowSeg network and the plain UNet of the same backbone, a training
step (batch 16) and inference (batches of 32 and of 1 slice) at 96 x 96, with 1, 2, ... threads.
Each thread count runs in its own process so torch's thread pool is set before first use.

    python benchmarks/threads.py [--out benchmarks/results/threads.json] [--repeats 5]

Writes JSON and prints a Markdown table of milliseconds and the speed-up over one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def measure(threads: int, repeats: int) -> dict:
    import torch

    from medflow.models.unet import NetConfig, SegNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out = {}
    for name, flow in (("medflowseg", True), ("unet", False)):
        net = SegNet(NetConfig(in_channels=1, num_classes=3, flow=flow))
        opt = torch.optim.AdamW(net.parameters())

        def call(b: int, net=net, flow=flow):
            img = torch.randn(b, 1, 96, 96)
            return net(torch.randn(b, 3, 96, 96), torch.rand(b), img) if flow else net(img)

        def train_step(call=call, opt=opt):
            call(16).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

        def timed(fn, n=repeats):
            fn()  # warm-up: allocator, oneDNN primitive cache
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) / n * 1000.0

        with torch.no_grad():
            infer32 = timed(lambda call=call: call(32))
            infer1 = timed(lambda call=call: call(1), n=repeats * 10)
        out[name] = {
            "train_step_b16_ms": timed(train_step),
            "infer_b32_ms": infer32,
            "infer_b1_ms": infer1,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/threads.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.repeats)))
        return 0
    cores = len(os.sched_getaffinity(0))
    results = {}
    for threads in range(1, cores + 1):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(threads), "--repeats", str(args.repeats)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[threads] = json.loads(proc.stdout.strip().splitlines()[-1])
    from medflow.engine.runtime import machine_info

    record = {
        "machine": machine_info(),
        "size": 96,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        "| model | measure | "
        + " | ".join(f"{t} thread(s) ms" for t in results)
        + " | speed-up of most threads |"
    )
    print("|---|---|" + "---|" * len(results) + "---|")
    for model in ("medflowseg", "unet"):
        for key in ("train_step_b16_ms", "infer_b32_ms", "infer_b1_ms"):
            vals = [results[t][model][key] for t in results]
            print(
                f"| {model} | {key} | "
                + " | ".join(f"{v:.1f}" for v in vals)
                + f" | {vals[0] / vals[-1]:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
