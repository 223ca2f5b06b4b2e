"""Does channels-last memory format or torch.compile make the networks faster on this CPU?

For the default MedFlowSeg network and the plain UNet of the same backbone
(``medflow.segmentation.train.build_net``), at 64 x 64 and 96 x 96, times

* inference through the real prediction path (the method's ``probs``, one Euler step: the image
  features, one network call, the noise and the probabilities) on batches of 1 and 32 slices;
* one training step (forward, the training loss, backward, AdamW) at batch 16, the default
  training batch;

each in four set-ups, built by ``runtime.configure_net`` as ``medflow predict --compile
--channels-last`` builds them: eager or compiled, contiguous or channels-last; with 1 and 2
intra-op threads, each thread count in a process of its own (torch's pool is sized before
first use) with an inductor cache folder of its own (compile times are cold).

This VM's timings drift by 10-20 % within seconds, so, as in benchmarks/cost.py, the four
set-ups of one task are timed in rounds, in a fresh random order each round, each as one
untimed call and then a block of calls; a set-up's time is the median over rounds of its
block means, and its ratio is to eager/contiguous from the same rounds. A compiled set-up's
first call (the compilation) and one more are timed apart and excluded.

    python benchmarks/speed.py [--repeats 5] [--sizes 64 96] [--threads 1 2]
        [--modes eager compile] [--models medflowseg unet] [--out benchmarks/results/speed.json]
    python benchmarks/speed.py --quick      # smoke test: 32 x 32, tiny networks, 1 round

Writes JSON and prints a Markdown table. Compilation dominates the run time: a minute or
more per compiled MedFlowSeg set-up and shape on 2 cores, 24 of them per thread count at the
default sizes (about 40-50 min in all; ``--modes eager`` takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NUM_CLASSES = 3
# calls per timed block: batch-1 calls take milliseconds, the others a second or so
BLOCK = {"infer_b1": 10}
SETUPS = [  # (mode, memory format); the first is the baseline
    ("eager", "contiguous"),
    ("eager", "channels_last"),
    ("compile", "contiguous"),
    ("compile", "channels_last"),
]


def _tasks(cfg: dict) -> list[tuple[str, int]]:
    return [(f"infer_b{b}", b) for b in cfg["batches"]] + [
        (f"train_b{cfg['train_batch']}", cfg["train_batch"])
    ]


def _setup(model: str, size: int, task: str, batch: int, mode: str, fmt: str, cfg: dict):
    """A fresh network in this set-up and a no-argument function running ``task`` once."""
    import torch

    from medflow.engine.runtime import configure_net
    from medflow.flows.encoding import mask_to_flow
    from medflow.flows.losses import MedFlowSegLoss
    from medflow.flows.paths import LinearPath
    from medflow.segmentation.config import TrainConfig
    from medflow.segmentation.inference import SamplingOptions
    from medflow.segmentation.methods import method_for
    from medflow.segmentation.train import build_net

    torch.manual_seed(0)
    tcfg = TrainConfig(model=model, size=size, channels=tuple(cfg["channels"]))
    net = build_net(tcfg, 1, NUM_CLASSES)
    run = configure_net(net, channels_last=fmt == "channels_last", compile=mode == "compile")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 1, size, size, generator=gen)
    if task.startswith("infer"):
        net.eval()
        options = SamplingOptions(steps=1, sampler="euler", batch_size=batch)
        return lambda: method_for(tcfg).probs(run, images, options)

    net.train()
    masks = torch.randint(NUM_CLASSES, (batch, size, size), generator=gen)
    x1 = mask_to_flow(masks, NUM_CLASSES)
    loss_fn, path = MedFlowSegLoss(), LinearPath()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        if model == "unet":
            terms = loss_fn.segmentation_only(run(images), masks)
        else:
            x0, t = torch.randn(x1.shape, generator=gen), torch.rand(batch, generator=gen)
            sample = path.sample(x0, x1, t)
            terms = loss_fn(run(sample.x_t, t, images), sample, x1, masks)
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()

    return step


def measure(threads: int, cfg: dict) -> list[dict]:
    """Every (model, size, task) in this process, its set-ups timed in shuffled rounds."""
    import torch

    torch.set_num_threads(threads)
    rows = []
    for model in cfg["models"]:
        for size in cfg["sizes"]:
            for task, batch in _tasks(cfg):
                # a clean slate of compiled code per task: guards of earlier networks would
                # count against dynamo's recompile limit
                torch._dynamo.reset()
                setups = [s for s in SETUPS if s[0] in cfg["modes"]]
                fns, info = {}, {}
                for mode, fmt in setups:
                    fn = _setup(model, size, task, batch, mode, fmt, cfg)
                    entry = {"compile_s": None, "error": None}
                    try:
                        t0 = time.perf_counter()
                        fn()  # compiles a compiled set-up; warms caches either way
                        if mode == "compile":
                            entry["compile_s"] = time.perf_counter() - t0
                        fn()
                        fns[(mode, fmt)] = fn
                    except Exception as exc:  # a set-up that cannot run is reported, not fatal
                        entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    info[(mode, fmt)] = entry
                times: dict[tuple, list[float]] = {k: [] for k in fns}
                order, rng = list(fns), random.Random(0)
                block = BLOCK.get(task, 1)
                for _ in range(cfg["repeats"]):
                    rng.shuffle(order)
                    for key in order:
                        fns[key]()  # untimed: this set-up's caches after the previous one's
                        t0 = time.perf_counter()
                        for _ in range(block):
                            fns[key]()
                        times[key].append((time.perf_counter() - t0) * 1000.0 / block)
                base = statistics.median(times[SETUPS[0]]) if SETUPS[0] in times else None
                for mode, fmt in setups:
                    ms = times.get((mode, fmt))
                    median = statistics.median(ms) if ms else None
                    rows.append(
                        {
                            "threads": threads,
                            "model": model,
                            "size": size,
                            "task": task,
                            "batch": batch,
                            "mode": mode,
                            "memory_format": fmt,
                            "median_ms": median,
                            "rounds_ms": ms,
                            "vs_eager_contiguous": median / base if median and base else None,
                            **info[(mode, fmt)],
                        }
                    )
                print(f"threads {threads} | {model} {size} {task}: done", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    """One line per thread count, model, size and task; each set-up's median ms and its time
    relative to eager/contiguous (below 1: faster); the compile seconds."""
    head = " | ".join(f"{m} {f.replace('_', '-')} ms (x base)" for m, f in SETUPS)
    lines = [
        f"| threads | model | size | task | {head} | compile s (contiguous / channels-last) |",
        "|---|---|---|---|" + "---|" * (len(SETUPS) + 1),
    ]
    for key in sorted({_key(r) for r in rows}):
        by = {(r["mode"], r["memory_format"]): r for r in rows if key == _key(r)}
        cells = []
        for s in SETUPS:
            r = by.get(s)
            if r is None:
                cells.append("-")
            elif r["median_ms"] is None:
                cells.append("failed")
            else:
                cells.append(f"{r['median_ms']:.1f} ({r['vs_eager_contiguous']:.2f})")
        compiled = [by.get(("compile", f), {}).get("compile_s") for _, f in SETUPS[2:]]
        comp = " / ".join("-" if c is None else f"{c:.0f}" for c in compiled)
        threads, model, size, task = key
        lines.append(f"| {threads} | {model} | {size} | {task} | {' | '.join(cells)} | {comp} |")
    return "\n".join(lines) + "\n"


def _key(r: dict) -> tuple:
    return (r["threads"], r["model"], r["size"], r["task"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON to write")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per set-up")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="inference")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=["medflowseg", "unet"],
                        choices=("medflowseg", "unet"))  # fmt: skip
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"],
                        choices=("eager", "compile"))  # fmt: skip
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 32 x 32, channels 8,16, batches 1 and 4, train batch 2, one round, "
        "one thread; writes benchmarks/results/speed_quick.json unless --out is given",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        threads, cfg = json.loads(args.child)
        print(json.dumps(measure(threads, cfg)))
        return 0
    cfg = {
        "sizes": args.sizes,
        "batches": args.batches,
        "train_batch": args.train_batch,
        "models": args.models,
        "modes": args.modes,
        "repeats": args.repeats,
        "channels": [16, 32, 64, 128],
    }
    threads = args.threads
    if args.quick:
        cfg.update(sizes=[32], batches=[1, 4], train_batch=2, repeats=1, channels=[8, 16])
        threads = [1]
    out = args.out or Path(f"benchmarks/results/{'speed_quick' if args.quick else 'speed'}.json")
    rows = []
    for t in threads:
        with tempfile.TemporaryDirectory(prefix="medflow_inductor_") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps([t, cfg])],
                stdout=subprocess.PIPE,
                text=True,
                check=True,
                env=env,
            )
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    from medflow.engine.runtime import machine_info

    record = {"machine": machine_info(), "torch": torch.__version__, "config": cfg, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(rows), end="")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
