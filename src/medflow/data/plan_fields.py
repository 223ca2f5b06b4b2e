"""The fields of a :class:`medflow.data.plan.Plan`: one validating parser per field.

A parser takes the field's name and a value, typed (from Python or JSON) or text (from
``medflow plan --set FIELD=VALUE``: numbers, ``a,b`` for pairs and lists, ``true``/``false``,
``lo,hi,mean,std;...`` for ``ct_stats``), and returns the typed value or raises a
``ValueError`` that names the field and the value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

SCHEME_NAMES = ("ct", "zscore", "none", "rescale", "rgb")
COMPUTE_NAMES = ("gpu", "cpu")


def _int(lo: int = 0, hi: int | None = None) -> Callable[[str, Any], int]:
    def parse(name: str, value: Any) -> int:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"plan field {name!r}: {value!r} is not an integer") from None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"plan field {name!r}: {value!r} is not an integer")
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise ValueError(f"plan field {name!r}: {value} must be {bound}")
        return int(value)

    return parse


def _float(lo: float, hi: float | None = None, open_lo: bool = False) -> Callable:
    def parse(name: str, value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"plan field {name!r}: {value!r} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise ValueError(f"plan field {name!r}: {value!r} is not a number")
        value = float(value)
        low_ok = value > lo if open_lo else value >= lo
        if not math.isfinite(value) or not low_ok or (hi is not None and value > hi):
            bound = f"in [{lo:g}, {hi:g}]" if hi is not None else f"above {lo:g}"
            raise ValueError(f"plan field {name!r}: {value:g} must be {bound}")
        return value

    return parse


def _seq(item: Callable, length: int | None = None) -> Callable:
    def parse(name: str, value: Any) -> tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"plan field {name!r}: {value!r} is not a list of values")
        if length is not None and len(value) != length:
            raise ValueError(f"plan field {name!r}: {value!r} needs {length} values")
        if not value:
            raise ValueError(f"plan field {name!r}: needs at least one value")
        return tuple(item(name, v) for v in value)

    return parse


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
    if isinstance(value, bool):
        return value
    raise ValueError(f"plan field {name!r}: {value!r} is not true or false")


def _scheme(name: str, value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in SCHEME_NAMES:
        raise ValueError(f"plan field {name!r}: {value!r} is not one of {', '.join(SCHEME_NAMES)}")
    return value.strip().lower()


def _compute(name: str, value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in COMPUTE_NAMES:
        raise ValueError(f"plan field {name!r}: {value!r} is not one of {', '.join(COMPUTE_NAMES)}")
    return value.strip().lower()


def _ct_stats(name: str, value: Any) -> tuple:
    if isinstance(value, str):  # "lo,hi,mean,std;lo,hi,mean,std"
        value = [v for v in value.split(";") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"plan field {name!r}: {value!r} is not a list of (lo, hi, mean, std)")
    stats = tuple(_seq(_float(-math.inf), 4)(name, v) for v in value)
    for lo, hi, _, std in stats:
        if not (lo <= hi and std > 0):
            raise ValueError(f"plan field {name!r}: need lo <= hi and std > 0, got {stats}")
    return stats


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"plan field {name!r}: {value!r} is not text")
    return value


def _reasons(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"plan field {name!r}: {value!r} is not a list of lines")
    return tuple(_text(name, v) for v in value)


FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "dataset": _text,
    "dims": _int(2, 3),
    "slice_axis": _int(0, 2),
    "target_spacing": _seq(_float(0.0, open_lo=True), 2),
    "median_shape": _seq(_int(1), 2),
    "patch_size": _seq(_int(2), 2),
    "levels": _int(1, 10),
    "channels": _seq(_int(1)),
    "batch_size": _int(1),
    "memory_gib": _float(0.0, open_lo=True),
    "estimated_memory_gib": _float(0.0),
    "normalisation": _seq(_scheme),
    "ct_stats": _ct_stats,
    "foreground_fraction": _float(0.0, 1.0),
    "class_balanced": _bool,
    "context_slices": _int(0, 16),
    "compute": _compute,
    "reasons": _reasons,
}
# facts about the data or results of the plan, not choices
NOT_SETTABLE = ("dataset", "dims", "median_shape", "estimated_memory_gib", "reasons")
SETTABLE = tuple(n for n in FIELDS if n not in NOT_SETTABLE)


def parse_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``overrides`` (values typed, or text as from ``--set FIELD=VALUE``) validated and
    typed.

    Raises:
        ValueError: naming an unknown or unsettable field, or a field and its bad value.
    """
    parsed = {}
    for name, value in (overrides or {}).items():
        if name in NOT_SETTABLE:
            raise ValueError(f"plan field {name!r} is computed from the data, not set")
        if name not in FIELDS:
            raise ValueError(f"unknown plan field {name!r}; settable fields: {', '.join(SETTABLE)}")
        parsed[name] = FIELDS[name](name, value)
    return parsed
