"""Several processes, one run: torchrun's ranks, the process group, and how a global batch
and a folder of cases are split between ranks (docs/DISTRIBUTED.md).

``torchrun`` (``python -m torch.distributed.run``) starts one process per rank and tells each
who it is through ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; that
environment is torchrun's contract, so it is read here rather than passed as arguments.
Without it (a plain ``medflow train``) everything here is the identity: one rank, no process
group, no communication, and the single-process code path is unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from medflow.errors import MedflowError

T = TypeVar("T")
ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the processes of one run.

    Attributes:
        rank: global rank, 0 .. world - 1; rank 0 logs and writes files.
        world: number of processes in the run.
        local_rank: rank on this machine (picks the GPU ``cuda:local_rank``).
        local_world: processes on this machine (they share its CPU cores).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Ranks:
        """Read torchrun's variables; a process started without them is the only rank."""
        environ = os.environ if environ is None else environ
        values = {}
        for name in ENV:
            text = environ.get(name)
            try:
                values[name] = None if text is None else int(text)
            except ValueError as exc:
                raise MedflowError(f"{name}={text!r}: not an integer (torchrun sets it)") from exc
        world = values["WORLD_SIZE"] or 1
        rank = values["RANK"] or 0
        local_rank = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
        local_world = values["LOCAL_WORLD_SIZE"] or world
        if not (world >= 1 and 0 <= rank < world and 0 <= local_rank < local_world <= world):
            raise MedflowError(
                f"inconsistent torchrun environment: WORLD_SIZE={world} RANK={rank} "
                f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}"
            )
        return cls(rank, world, local_rank, local_world)

    @property
    def active(self) -> bool:
        """More than one process: gradients and barriers go through a process group."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0, the one process that logs and writes the run folder."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world``-th one, starting at ``rank``."""
        return list(items[self.rank :: self.world])

    def batch_part(self, batch: int) -> slice:
        """This rank's rows of a global batch of ``batch`` samples (all of them for one rank).

        Raises:
            MedflowError: ``batch`` is not a multiple of the number of processes.
        """
        if batch % self.world:
            raise MedflowError(
                f"--batch-size {batch} is the global batch and must be a multiple of the "
                f"number of processes ({self.world}); use e.g. "
                f"{max(self.world, batch - batch % self.world)}"
            )
        n = batch // self.world
        return slice(self.rank * n, (self.rank + 1) * n)


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


_groups_joined = 0  # process groups this process has created, the same count on every rank


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the duration of the block and leave it afterwards,
    also on error. Nothing happens for a single rank, or when the caller (a user's script)
    has already initialised a group: that group is used and left alone.

    A script may call ``train`` and then ``predict_folder`` under one torchrun launch, so a
    process can create the default group several times. torch names it the same every time
    and torchrun's store outlives it, so a second group would meet the first one's keys
    in the store and can hang (pytorch/pytorch#55967); each group here gets keys of its own.
    """
    global _groups_joined
    if not ranks.active or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store, _, _ = next(dist.rendezvous("env://", ranks.rank, ranks.world))
    _groups_joined += 1
    dist.init_process_group(
        backend_for(device),
        store=dist.PrefixStore(f"medflow/{_groups_joined}", store),
        rank=ranks.rank,
        world_size=ranks.world,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
        # no rank tears the group down while another still uses it (pytorch/pytorch#119196);
        # not after an error, where the other ranks may never arrive
        dist.barrier()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` across ranks (the values themselves for one rank)."""
    if not dist.is_initialized():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects; ``obj`` itself for one rank)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def torchrun_command(processes: int, argv: Sequence[str]) -> list[str]:
    """The command that runs ``medflow <argv>`` as ``processes`` ranks on this machine.

    ``python -m torch.distributed.run`` rather than the ``torchrun`` script, so the current
    interpreter (and its virtual environment) runs every rank; ``--standalone`` picks a free
    port, so several such runs on one machine do not collide.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "-m",
        "medflow.cli",
        *argv,
    ]
