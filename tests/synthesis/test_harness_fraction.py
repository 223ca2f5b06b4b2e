"""The harness gives a fixed synthetic share to the arms that add synthetic pairs only."""

import pytest

from medflow.segmentation.config import TrainConfig
from medflow.synthesis.harness import HarnessConfig, _segmenter, conditions


def test_only_arms_with_synthetic_pairs_get_the_synthetic_fraction():
    cfg = HarnessConfig(synthetic_fraction=0.5, baselines=("augmented", "real_masks"))
    fields = {c.name: _segmenter(cfg, c) for c in conditions(cfg, stage1_steps=20)}
    with_share = {n for n, f in fields.items() if f.get("synthetic_fraction") == 0.5}
    assert with_share == {
        "source+unaligned",
        "source+stage-1 on real masks",
        *(f"source+aligned K={k}" for k in cfg.ks),
    }
    # the real-only arms (source, augmented copies, the oracle) train as before
    for name in ("source", "source+augmented", "target labelled (oracle)"):
        assert fields[name] == cfg.segmenter
    TrainConfig(**fields["source+unaligned"])  # a valid segmenter config


def test_without_a_fraction_every_arm_keeps_the_segmenter_fields():
    cfg = HarnessConfig()
    assert all(_segmenter(cfg, c) is cfg.segmenter for c in conditions(cfg, stage1_steps=20))
    with pytest.raises(ValueError, match="synthetic_fraction"):
        HarnessConfig(synthetic_fraction=1.0)
