"""Two CPU processes under torchrun train like one process with the combined batch, and
share a folder of cases for prediction (docs/DISTRIBUTED.md).

One torchrun launch runs every distributed command (torchrun_worker.py), so the module pays
the start-up of two processes once; the single-process references run in this process.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN, make_nnunet_dataset, train_flags

from medflow.engine.checkpoint import load_checkpoint
from medflow.engine.distributed import Ranks
from medflow.engine.runtime import configure_threads
from medflow.errors import MedflowError
from medflow.flows.losses import LossTerms, MedFlowSegLoss
from medflow.flows.paths import PathSample
from medflow.models.unet import NetConfig, SegNet
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.predict import predict_folder
from medflow.segmentation.train import train

NPROC = 2
STEPS = 4
WORKER = Path(__file__).with_name("torchrun_worker.py")
# batch 4 is the global batch: 2 slices per rank
TRAIN = train_flags(val_every=2, checkpoint_every=2, warmup_steps=2, steps=STEPS)
DICE_TRAIN = [*TRAIN, "--shortcut-fraction", "0"]  # the default loss, as CONFIG below
# the Dice comparison runs without shortcut rows, whose placement in the batch PerRankLoss
# does not emulate; the squared-error run keeps them (the default): its DDP loss must equal
# the one-process loss exactly, shortcut self-consistency included
CONFIG = TrainConfig(**{**TINY_TRAIN, "steps": STEPS, "shortcut_fraction": 0.0})
MSE = TrainConfig(**{**TINY_TRAIN, "steps": STEPS, "seg_weight": 0.0})

# Float32 summation order differs (a gradient summed over 4 slices in one process, over 2
# and 2 then all-reduced in two); measured after 4 steps: 2e-6 on the network output, 6e-6
# on the weights (apart from the inert biases, see _inert).
OUTPUT_ATOL_EXACT = 1e-5
WEIGHT_ATOL_EXACT = 1e-4
# The soft Dice term pools the batch (DiceCELoss(batch=True)): two ranks average the Dice of
# two half-batches, not the Dice of the whole batch. Measured after 4 steps at lr 2e-3: weights
# 3e-3 apart, network outputs 1e-2 apart (Adam moves a weight by about lr per step whatever
# the gradient's size, so a different gradient direction shows up at that scale).
OUTPUT_ATOL_DICE = 5e-2
WEIGHT_ATOL_DICE = 1e-2


def _crash_after_step_2(data: Path, out: Path, cfg: TrainConfig) -> None:
    """A single-process run that stops after its step-2 checkpoint (as test_train does)."""
    import medflow.segmentation.train as train_module

    real_update, calls = train_module.ema_update, []

    def crash_on_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(train_module, "ema_update", crash_on_third_step)
        train(data, out, cfg, quiet=True)
    assert load_checkpoint(out / "checkpoint_last.pt")["step"] == 2


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Run two trainings, a resumed training and a prediction under
    ``torchrun --nproc_per_node 2``."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_nnunet_dataset(root / "ds", n_test=3)  # 3 cases: ranks get 2 and 1
    _crash_after_step_2(data, root / "resumed_mse", MSE)
    commands = [
        ["train", "--data", str(data), "--out", str(root / "ddp"), *DICE_TRAIN],
        ["train", "--data", str(data), "--out", str(root / "ddp_mse"), *TRAIN, "--seg-weight", "0"],
        ["train", "--data", str(data), "--out", str(root / "resumed_mse"), "--resume", "--quiet"],
        [
            "predict",
            "--model",
            str(root / "ddp" / "checkpoint_final.pt"),
            "--input",
            str(data / "imagesTs"),
            "--out",
            str(root / "pred"),
            "--threads",
            "1",
            "--quiet",
        ],
    ]
    (root / "commands.json").write_text(json.dumps(commands))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port of its own: tests running side by side do not collide
            "--nproc_per_node",
            str(NPROC),
            str(WORKER),
            str(root / "commands.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, data, proc.stdout


class PerRankLoss(MedFlowSegLoss):
    """The loss as two ranks compute it: each half of the batch on its own, averaged."""

    def __call__(self, logits, sample, x1, mask):
        halves = []
        for i in range(NPROC):

            def half(v, i=i):
                return v.chunk(NPROC)[i]

            path = PathSample(half(sample.x_t), half(sample.dx_t), half(sample.t))
            halves.append(MedFlowSegLoss.__call__(self, half(logits), path, half(x1), half(mask)))
        return LossTerms(
            *(sum(getattr(h, f) for h in halves) / NPROC for f in ("total", "flow", "seg"))
        )


def _net(ckpt: dict, key: str) -> SegNet:
    net = SegNet(NetConfig.from_dict(ckpt["net"]))
    net.load_state_dict(ckpt[key])
    return net


def _probe():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, 16, generator=g)
    return x, torch.rand(8, generator=g), torch.randn(8, 1, 16, 16, generator=g)


def _inert(ckpt: dict) -> set[str]:
    """Parameters the output does not depend on: a conv bias followed by a GroupNorm with
    one channel per group is subtracted out again. Their gradient is rounding noise, which
    Adam's normalisation turns into steps of size lr, so they are compared through the
    output only."""
    net = _net(ckpt, "model")
    x, t, img = _probe()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (net(x, t, img) * weights).sum().backward()
    top = max(p.grad.abs().max() for p in net.parameters())
    return {n for n, p in net.named_parameters() if p.grad.abs().max() < 1e-5 * top}


def _assert_close(a: dict, b: dict, weight_atol: float, output_atol: float) -> None:
    inert = _inert(a)
    assert len(inert) < len(a["model"]) // 4  # the exclusion must not swallow the network
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys(), key
        for name, tensor in a[key].items():
            if name not in inert:
                diff = (tensor - b[key][name]).abs().max().item()
                assert diff <= weight_atol, (key, name, diff)
        with torch.no_grad():
            args = _probe()
            diff = (_net(a, key)(*args) - _net(b, key)(*args)).abs().max().item()
        assert diff <= output_atol, (key, "output", diff)


def _rows(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "log.csv").read_text().splitlines()))


def test_ranks_split_the_global_batch_and_the_cases():
    one = Ranks.from_env({})
    assert (one.rank, one.world, one.active, one.main) == (0, 1, False, True)
    assert one.batch_part(5) == slice(0, 5) and one.shard("abc") == ["a", "b", "c"]
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    second = Ranks.from_env(env)
    assert second.active and not second.main
    assert second.batch_part(4) == slice(2, 4) and second.shard("abcde") == ["b", "d"]
    first = Ranks.from_env({**env, "RANK": "0", "LOCAL_RANK": "0"})
    rows = list(range(8))
    assert rows[first.batch_part(8)] + rows[second.batch_part(8)] == rows
    with pytest.raises(MedflowError, match="batch-size 5 is the global batch"):
        second.batch_part(5)
    with pytest.raises(MedflowError, match="inconsistent torchrun environment"):
        Ranks.from_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_threads_default_to_the_cores_shared_between_local_processes(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    for name, value in (("WORLD_SIZE", 4), ("RANK", 1), ("LOCAL_RANK", 1), ("LOCAL_WORLD_SIZE", 2)):
        monkeypatch.setenv(name, str(value))
    try:
        assert configure_threads(None) == max(1, cores // 2)
        assert configure_threads(3) == 3  # --threads wins
    finally:
        torch.set_num_threads(1)


def test_two_processes_train_like_one_with_the_combined_batch(launched, tmp_path, monkeypatch):
    root, data, _ = launched
    ddp = load_checkpoint(root / "ddp" / "checkpoint_last.pt")
    ddp_mse = load_checkpoint(root / "ddp_mse" / "checkpoint_last.pt")
    assert ddp["step"] == ddp_mse["step"] == STEPS
    assert not any(n.startswith("module.") for n in ddp["model"])  # the bare network's weights
    info = json.loads((root / "ddp" / "config.json").read_text())
    assert info["processes"] == NPROC and info["config"]["batch_size"] == 4
    assert [int(r["step"]) for r in _rows(root / "ddp")] == list(range(1, STEPS + 1))

    one = train(data, tmp_path / "one", CONFIG, quiet=True)
    one_mse = train(data, tmp_path / "one_mse", MSE, quiet=True)
    one, one_mse = (load_checkpoint(r.run_dir / "checkpoint_last.pt") for r in (one, one_mse))

    # without the Dice term the loss is a mean over samples: the same optimisation
    _assert_close(ddp_mse, one_mse, WEIGHT_ATOL_EXACT, OUTPUT_ATOL_EXACT)
    for a, b in zip(_rows(root / "ddp_mse"), _rows(tmp_path / "one_mse")):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4)

    # with it, the two processes optimise exactly the mean of two half-batch losses ...
    import medflow.segmentation.methods as methods_module

    monkeypatch.setattr(methods_module, "MedFlowSegLoss", PerRankLoss)
    per_rank = train(data, tmp_path / "per_rank", CONFIG, quiet=True).run_dir
    _assert_close(
        ddp, load_checkpoint(per_rank / "checkpoint_last.pt"), WEIGHT_ATOL_EXACT, OUTPUT_ATOL_EXACT
    )
    # ... which is close to, not equal to, the combined batch's loss
    _assert_close(ddp, one, WEIGHT_ATOL_DICE, OUTPUT_ATOL_DICE)
    first_ddp, first_one = _rows(root / "ddp")[0], _rows(tmp_path / "one")[0]
    # step 1 sees the same slices, noise and times: the flow term (a plain mean) agrees
    assert float(first_ddp["flow_loss"]) == pytest.approx(float(first_one["flow_loss"]), rel=1e-5)


def test_sharded_prediction_writes_what_one_process_writes(launched, tmp_path):
    root, data, stdout = launched
    assert "wrote 3 prediction(s)" in stdout  # every rank returns all outputs
    alone = predict_folder(
        root / "ddp" / "checkpoint_final.pt", data / "imagesTs", tmp_path / "p", quiet=True
    )
    shared = sorted((root / "pred").iterdir())
    assert (
        [p.name for p in shared]
        == [p.name for p in alone]
        == [
            "case04.nii.gz",
            "case05.nii.gz",
            "case06.nii.gz",
        ]
    )
    for a, b in zip(alone, shared):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_a_run_resumes_under_two_processes(launched):
    """Steps 1-2 in one process, 3-4 in two: every rank reads checkpoint_last.pt and its
    generator state, and the data drawn does not depend on the number of processes."""
    root, _, _ = launched
    resumed = load_checkpoint(root / "resumed_mse" / "checkpoint_last.pt")
    assert resumed["step"] == STEPS
    _assert_close(
        resumed,
        load_checkpoint(root / "ddp_mse" / "checkpoint_last.pt"),
        WEIGHT_ATOL_EXACT,
        OUTPUT_ATOL_EXACT,
    )
    assert [int(r["step"]) for r in _rows(root / "resumed_mse")] == list(range(1, STEPS + 1))


def test_processes_flag_trains_exactly_like_torchrun(launched, capsys):
    """`medflow train --processes 2` starts the same two ranks torchrun does: same weights."""
    from medflow.cli import main

    root, data, _ = launched
    out = root / "relaunched"
    argv = ["train", "--data", str(data), "--out", str(out), *DICE_TRAIN, "--processes", "2"]
    assert main(argv) == 0
    for name, keys in (
        ("checkpoint_last.pt", ("model", "ema")),
        ("checkpoint_final.pt", ("model",)),
    ):
        ours, theirs = load_checkpoint(out / name), load_checkpoint(root / "ddp" / name)
        for key in keys:
            assert ours[key].keys() == theirs[key].keys()
            for param, tensor in theirs[key].items():
                assert torch.equal(ours[key][param], tensor), (name, key, param)
    untimed = [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(out)]
    assert untimed == [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(root / "ddp")]


def test_processes_flag_reports_a_rank_user_error_in_one_line(tmp_path, capsys):
    from medflow.cli import main

    (tmp_path / "data").mkdir()
    code = main(
        ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *TRAIN,
         "--processes", "2"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "dataset.json" in err[0] and err[0].startswith("medflow train: error")
    assert not (tmp_path / "run").exists()


def test_two_processes_stop_together_on_a_plateau(launched):
    """Rank 0 decides the plateau and the other rank takes its answer: both stop at the
    same step and the run folder is complete (a rank left training would hang the run)."""
    from medflow.cli import main

    root, data, _ = launched
    out = root / "plateau"
    plateau = ["--lr-schedule", "constant", "--plateau-patience", "1", "--plateau-delta", "1"]
    argv = ["train", "--data", str(data), "--out", str(out), *DICE_TRAIN, "--steps", "40",
            "--val-every", "2", *plateau, "--processes", "2"]  # fmt: skip
    assert main(argv) == 0
    assert load_checkpoint(out / "checkpoint_final.pt")["config"]["steps"] == 4
    assert [r["step"] for r in _rows(out)][-1] == "4"
