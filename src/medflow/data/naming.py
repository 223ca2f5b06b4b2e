"""How ``medflow predict`` names what it writes beside a case's mask ``<case><ending>``.

The writers (predict), the readers (evaluate, the report) and the scorers that must skip or
find these files (evaluate's folder pairing, ``evaluate --raters``) share this one module:

* ``<case>_variance<ending>``, ``<case>_entropy<ending>``: the uncertainty maps
  (:mod:`medflow.uncertainty.maps`);
* ``<case>_sample00<ending>`` ... ``_sample99``: posterior samples' label maps
  (``predict --save-samples``);
* ``<case>_probabilities<ending>``: the fused soft mask ``(X, Y, Z, K)``.
"""

from __future__ import annotations

import re

MAPS = ("variance", "entropy")


def map_name(case_id: str, kind: str, ending: str) -> str:
    """File name of a case's ``kind`` map (``"variance"`` or ``"entropy"``)."""
    if kind not in MAPS:
        raise ValueError(f"unknown uncertainty map {kind!r}; expected one of {list(MAPS)}")
    return f"{case_id}_{kind}{ending}"


def sample_name(case_id: str, index: int, ending: str) -> str:
    """File name of posterior sample ``index`` of a case (a label map), written by
    ``medflow predict --save-samples``: ``<case>_sample00<ending>``, ``_sample01``, ..."""
    if not 0 <= index < 100:
        raise ValueError(f"sample index must be in 0..99, got {index}")
    return f"{case_id}_sample{index:02d}{ending}"


PROBABILITIES = "probabilities"  # <case>_probabilities<ending>: the fused soft mask (X, Y, Z, K)


def split_map_name(case_id: str) -> tuple[str, str] | None:
    """``("case", "entropy")`` for the id ``"case_entropy"``, ``("case", "sample03")`` for
    ``"case_sample03"``, ``("case", "probabilities")`` for ``"case_probabilities"``; ``None``
    for any other id."""
    for kind in (*MAPS, PROBABILITIES):
        suffix = f"_{kind}"
        if case_id.endswith(suffix) and len(case_id) > len(suffix):
            return case_id[: -len(suffix)], kind
    m = _SAMPLE.fullmatch(case_id)
    return (m.group(1), f"sample{m.group(2)}") if m and m.group(1) else None


_SAMPLE = re.compile(r"(.+)_sample([0-9]{2})")


SYNTHETIC_PREFIX = "synth"  # synthetic cases written by ``synth sample``: ``synth_00000``


def is_synthetic(case_id: str) -> bool:
    """Whether ``case_id`` names a synthetic case (``synth_<n>``) of ``synth sample``."""
    return case_id.startswith(SYNTHETIC_PREFIX + "_")
