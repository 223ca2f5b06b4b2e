"""A training process killed with SIGKILL resumes from its last checkpoint and ends with the
weights of a run that was never interrupted, bit for bit (one CPU thread, fixed seeds)."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_TRAIN, make_nnunet_dataset

from medflow.cli import main
from medflow.engine.checkpoint import load_checkpoint
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.train import train

# enough steps after the first checkpoint that the kill lands mid-run even on a loaded machine
STEPS = 24
CONFIG = TrainConfig(**{**TINY_TRAIN, "steps": STEPS, "val_every": 10, "checkpoint_every": 2})


def _command(data, out, *extra: str) -> list[str]:
    flags = {
        "size": CONFIG.size,
        "channels": ",".join(map(str, CONFIG.channels)),
        "batch-size": CONFIG.batch_size,
        "threads": 1,
        "val-every": CONFIG.val_every,
        "checkpoint-every": CONFIG.checkpoint_every,
        "warmup-steps": CONFIG.warmup_steps,
        "steps": STEPS,
    }
    args = [arg for k, v in flags.items() for arg in (f"--{k}", str(v))]
    cli = [sys.executable, "-m", "medflow.cli", "train", "--data", str(data), "--out", str(out)]
    return [*cli, *args, *extra]


def _partials(run) -> list:
    return sorted(p.name for p in run.glob(".*.partial-*"))


def _kill_after_first_checkpoint(proc: subprocess.Popen, last, timeout: float = 240.0) -> int:
    """SIGKILL ``proc`` as soon as a checkpoint of step >= 2 can be read; returns its step."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if last.exists():
            # written to a temporary name and renamed: whatever is there is whole
            step = load_checkpoint(last)["step"]
            if step >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return step
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    pytest.fail(f"the run ended (code {proc.returncode}) before it could be killed mid-run")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    data = make_nnunet_dataset(tmp_path / "ds")
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(data, run, "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    seen = _kill_after_first_checkpoint(proc, run / "checkpoint_last.pt")
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(run / "checkpoint_last.pt")["step"]
    assert seen <= killed_at < STEPS and killed_at % CONFIG.checkpoint_every == 0
    assert not (run / "checkpoint_final.pt").exists()
    # at most the one file being written at the moment of the kill is left over
    assert len(_partials(run)) <= 1
    # a stale temporary file of a killed writer is removed by the resumed run
    (run / ".checkpoint_last.partial-999999.pt").write_bytes(b"half a checkpoint")

    # the resumed run goes through the same command line, in this process (one start-up less)
    assert main(_command(data, run, "--quiet", "--resume")[3:]) == 0
    assert f"trained {STEPS} steps" in capsys.readouterr().out
    assert _partials(run) == []

    full = train(data, tmp_path / "full", CONFIG, quiet=True).run_dir
    for name in ("checkpoint_last.pt", "checkpoint_final.pt"):
        a, b = load_checkpoint(full / name), load_checkpoint(run / name)
        assert a["step"] == b["step"] == STEPS
        for key in ("model", "ema"):
            if key in a:
                for param, tensor in a[key].items():
                    assert torch.equal(tensor, b[key][param]), (name, key, param)
    rows = list(csv.DictReader((run / "log.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))


def test_only_temporary_files_of_run_files_are_removed(tmp_path):
    from medflow.segmentation.train import _remove_partials

    stale = [".checkpoint_last.partial-12.pt", ".log.partial-7.csv", ".config.partial-3.json"]
    kept = [".notes.partial-1.txt", "checkpoint_last.pt", ".checkpoint_last.partial-x.pt"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in _remove_partials(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
