"""Counted cost per slice of every model and sampler setting medflow offers (no timing).

Parameters, network calls and GFLOPs per 96 x 96 slice (1 channel, 3 classes, default
channels) for the plain UNet, MedFlowSeg with 1, 2, 4, 8 Euler steps and Heun, a 5-sample
ensemble, MedFlowSeg without its image branch, DBSA and FAA, and the diffusion baseline with
DDIM-10, DDIM-50 and DDPM-1000, as counted by :func:`medflow.segmentation.cost.inference_cost`.

    python benchmarks/flops.py [--size 96] [--out benchmarks/results/flops.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from medflow.models.unet import NetConfig, SegNet
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.cost import inference_cost
from medflow.segmentation.inference import SamplingOptions as Opts
from medflow.segmentation.methods import Method, method_for

SETTINGS = [
    # name, network options, sampling options (a method by its network and sampler)
    ("unet", {"flow": False}, {}),
    ("medflowseg euler-1", {}, {}),
    ("medflowseg euler-2", {}, {"steps": 2}),
    ("medflowseg euler-4", {}, {"steps": 4}),
    ("medflowseg euler-8", {}, {"steps": 8}),
    ("medflowseg heun-4", {}, {"steps": 4, "sampler": "heun"}),
    ("medflowseg euler-1 x5 samples", {}, {"samples": 5}),
    ("medflowseg without DBSA", {"dbsa": False}, {}),
    ("medflowseg without FAA", {"faa": False}, {}),
    ("flow, concatenation only", {"image_branch": False, "dbsa": False, "faa": False}, {}),
    ("diffusion ddim-10", {}, {"steps": 10, "sampler": "ddim"}),
    ("diffusion ddim-50", {}, {"steps": 50, "sampler": "ddim"}),
    ("diffusion ddpm-1000", {}, {"steps": 1000, "sampler": "ddpm"}),
]


def _method(net_kw: dict, sampling: dict) -> Method:
    """The method whose prediction path a setting counts."""
    if not net_kw.get("flow", True):
        return method_for(TrainConfig(model="unet"))
    if sampling.get("sampler") in ("ddim", "ddpm"):
        return method_for(TrainConfig(model="diffusion"))
    return method_for(TrainConfig(shortcut_fraction=0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/flops.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, net_kw, sampling in SETTINGS:
        torch.manual_seed(0)
        net = SegNet(NetConfig(in_channels=1, num_classes=3, **net_kw))
        cost = inference_cost(_method(net_kw, sampling), net, args.size, Opts(**sampling))
        rows.append({"setting": name, **vars(cost)})
    unet = rows[0]["gflops"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "rows": rows}, indent=2) + "\n")
    print("| setting | parameters | network calls / slice | GFLOPs / slice | vs UNet |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['parameters']:,} | {r['evaluations']} | "
            f"{r['gflops']:.3f} | {r['gflops'] / unet:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
