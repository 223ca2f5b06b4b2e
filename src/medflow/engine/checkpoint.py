"""Checkpoints: one dict of tensors and plain values, written atomically, read with
``torch.load(weights_only=True)`` so a checkpoint cannot run code when it is opened."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from medflow.data.io import atomic_write
from medflow.errors import DataError

FORMAT = "medflow-checkpoint-v1"
REQUIRED = ("format", "config", "net", "preprocessing", "labels", "channel_names", "model", "step")


def save_checkpoint(path: str | Path, payload: dict, required: tuple[str, ...] = REQUIRED) -> Path:
    """Write ``payload`` (which must hold the ``required`` keys) to ``path`` atomically."""
    missing = [k for k in required if k not in payload]
    assert not missing, f"checkpoint payload lacks {missing}"
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(
    path: str | Path, fmt: str = FORMAT, required: tuple[str, ...] = REQUIRED
) -> dict:
    """Read a medflow checkpoint on the CPU (by default a segmentation checkpoint; the
    synthesis checkpoints pass their own ``fmt`` and ``required`` keys).

    Raises:
        DataError: the file is missing, not a checkpoint, holds pickled objects other than
            tensors and plain containers (refused unread), or lacks medflow's keys.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(
            path,
            "refused: the checkpoint holds objects other than tensors and "
            f"plain values, which could run code when loaded ({first[:120]})",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in many ways (KeyError,
        # EOFError, BadZipFile, RuntimeError ...); each is the same problem for the user
        raise DataError(
            path,
            f"not a readable checkpoint (truncated or not a torch file?): "
            f"{str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}",
        ) from exc
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise DataError(path, f"not a medflow checkpoint (expected format {fmt!r})")
    if ckpt["format"] != fmt:
        raise DataError(
            path,
            f"checkpoint format {str(ckpt['format'])[:60]!r} is not one this "
            f"medflow reads here ({fmt!r}); is it the right kind of checkpoint, written by "
            "this version?",
        )
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise DataError(path, f"checkpoint lacks {', '.join(missing)}")
    return ckpt
