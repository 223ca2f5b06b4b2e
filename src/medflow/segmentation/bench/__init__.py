"""`medflow bench`: UNet, MedFlowSeg and the diffusion baseline side by side, on the same data,
under the same budget, in one process.

For every dataset, budget, method and seed: train; then, for every sampling setting of that
method, predict the held-out split with the final EMA checkpoint and evaluate it at native
resolution (Dice, IoU, HD95, ASSD per class), and measure on the same test slices, under the
same threads: network latency (ms per slice at batch 1), throughput (slices per second at
the bench's batch), peak memory while predicting (resident set on CPU, max allocated on
CUDA) and the counted cost (:mod:`medflow.segmentation.cost`). Two budgets:

* ``steps``: every method trains the same number of steps;
* ``time``: every method trains for the same wall-clock time, the steps chosen from a short
  timed probe of that method on this machine (so each keeps a complete warm-up and cosine
  schedule).

Methods are the UNet, MedFlowSeg, its ablations (without DBSA, without FAA, without both)
and the diffusion baseline: each a set of TrainConfig fields (:data:`METHODS`). Settings of
more than ``BenchConfig.first_seed_only_above`` network calls per image (DDPM-1000) are
predicted, scored and timed on the first seed only, latency on one slice and throughput on
``latency_slices`` slices: on a 2-core CPU one DDPM-1000 pass over a test split takes minutes.

Writes ``results.json``, ``results.md``, ``dice_vs_cost.png`` and ``curves.png`` into the
output folder, and every run's own folder under ``runs/``.
"""

from medflow.segmentation.bench.config import (
    ABLATIONS,
    BUDGETS,
    FULL_SETTINGS,
    METHODS,
    QUICK_SETTINGS,
    BenchConfig,
)
from medflow.segmentation.bench.measure import measure_setting
from medflow.segmentation.bench.plots import method_style
from medflow.segmentation.bench.run import run_bench
from medflow.segmentation.bench.table import aggregate, markdown_table

__all__ = [
    "ABLATIONS",
    "BUDGETS",
    "FULL_SETTINGS",
    "METHODS",
    "QUICK_SETTINGS",
    "BenchConfig",
    "aggregate",
    "markdown_table",
    "measure_setting",
    "method_style",
    "run_bench",
]
