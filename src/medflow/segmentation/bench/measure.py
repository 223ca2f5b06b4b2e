"""Latency, throughput, peak memory and counted cost of one sampling setting."""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import torch

from medflow.data.datasets import prepare_image
from medflow.data.io import read_image
from medflow.data.layout import find_cases
from medflow.errors import MedflowError
from medflow.segmentation.cost import inference_cost
from medflow.segmentation.inference import SamplingOptions
from medflow.segmentation.predict import Predictor


class _PeakRSS:
    """Highest resident set of this process while the block runs (sampled every 5 ms from
    /proc; on systems without it, the process's lifetime peak)."""

    def __enter__(self) -> _PeakRSS:
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def scored_slices(data: Path, predictor: Predictor) -> torch.Tensor:
    cases = find_cases(data / "imagesTs", None, len(predictor.channel_names))
    if not cases:
        raise MedflowError(f"{data / 'imagesTs'}: no test images to benchmark on")
    return torch.cat([prepare_image(read_image(c.images), predictor.prep)[0] for c in cases])


def measure_setting(
    predictor: Predictor,
    slices: torch.Tensor,
    options: SamplingOptions,
    latency_slices: int,
    slow_above: int | None = None,
) -> dict:
    """Latency, throughput, peak memory and counted cost of one sampling setting.

    A setting of more than ``slow_above`` network calls per image is timed on less: latency
    on one slice (its own calls average the noise) and throughput on ``latency_slices``
    slices in one batch rather than the whole test split (``slow`` in the result).
    """
    # what predict draws the mask with (for a shortcut model and sampler auto, the
    # one-evaluation posterior mean), so the cost and times are those of the scored masks
    options = predictor.mask_options(options)
    device = predictor.device

    def run(batch: torch.Tensor) -> None:
        predictor.probs(batch.to(device), options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # counting runs the prediction path on one slice: it is also the warm-up (allocator,
    # oneDNN's primitive cache), and it says how many calls a slice costs before timing
    cost = inference_cost(predictor.method, predictor.net, slices.shape[-1], options)
    slow = slow_above is not None and cost.evaluations > slow_above
    n_latency = min(1 if slow else latency_slices, slices.shape[0])
    batch = slices[:latency_slices] if slow else slices
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(n_latency):
        t0 = time.perf_counter()
        run(slices[i : i + 1])
        times.append(time.perf_counter() - t0)
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        run(batch)
        batch_seconds = time.perf_counter() - t0
    return {
        "sampler": options.sampler,
        "steps": options.steps,
        "samples": options.samples,
        "parameters": cost.parameters,
        "evaluations_per_image": cost.evaluations,
        "gflops_per_image": cost.gflops,
        "slow": slow,
        "latency_ms_per_image": 1000.0 * statistics.median(times),
        "latency_slices": n_latency,
        "throughput_images_per_s": batch.shape[0] / batch_seconds,
        "throughput_slices": batch.shape[0],
        "peak_memory_mib": (
            torch.cuda.max_memory_allocated(device) / 2**20
            if device.type == "cuda"
            else rss.peak / 2**20
        ),
        "memory_kind": "cuda max allocated" if device.type == "cuda" else "cpu resident set",
    }
