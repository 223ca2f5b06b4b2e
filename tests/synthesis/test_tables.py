"""Paired gains and their t intervals, checked by hand."""

from __future__ import annotations

import math

import pytest

from medflow.synthesis.tables import (
    markdown,
    paired_across,
    paired_difference,
    paired_interval,
    summarise,
)


def _rows(condition: str, dice: list[float], seeds=(0, 1, 2)) -> list[dict]:
    return [
        {"condition": condition, "seed": s, "foreground": {"dice": d, "iou": d / 2}}
        for s, d in zip(seeds, dice)
    ]


def test_interval_by_hand():
    # differences 1, 2, 3: mean 2, s = 1, t(0.975, 2) = 4.302653
    low, high = paired_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert low == pytest.approx(2 - half, rel=1e-6) and high == pytest.approx(2 + half, rel=1e-6)
    assert paired_interval([5.0]) is None


def test_gains_are_paired_by_seed():
    # the seeds differ a lot, the condition adds exactly 1 point on every seed: the paired
    # interval is a point, the unpaired spreads are wide
    rows = _rows("source", [0.50, 0.60, 0.70]) + _rows("aligned", [0.51, 0.61, 0.71])
    by = {e["condition"]: e for e in summarise(rows)}
    assert by["aligned"]["dice"] == pytest.approx(61.0) and by["aligned"]["dice_std"] > 9
    assert by["aligned"]["dice_gain"] == pytest.approx(1.0)
    assert by["aligned"]["dice_gain_ci"] == pytest.approx([1.0, 1.0], abs=1e-9)
    assert by["aligned"]["iou_gain"] == pytest.approx(0.5)
    assert by["source"]["dice_gain"] == 0.0


def test_only_common_seeds_are_paired():
    rows = _rows("a", [0.5, 0.6, 0.7]) + _rows("b", [0.4, 0.2], seeds=(0, 2))
    d = paired_difference(rows, "a", "b")
    assert d["seeds"] == 2 and d["dice"] == pytest.approx((10.0 + 50.0) / 2)


def test_markdown_shows_intervals_and_contrasts():
    rows = _rows("source", [0.50, 0.60, 0.70]) + _rows("aligned", [0.52, 0.61, 0.73])
    record = {
        "summary": summarise(rows),
        "contrasts": [paired_difference(rows, "aligned", "source")],
        "distances_to_target_test": {"source real": {"mmd2": 0.5, "frechet": 2.0}},
        "faithfulness_dice": {},
        "mask_statistics": {
            "source real": {"1": {"area_mean": 0.3, "area_std": 0.1, "pairwise_dice": 0.4}}
        },
        "faithfulness_reference": {"source_segmenter_on_target_test": 0.6},
    }
    text = markdown(record)
    ci = summarise(rows)[1]["dice_gain_ci"]
    assert f"+2.0 [{ci[0]:+.1f}, {ci[1]:+.1f}]" in text
    assert "| aligned − source |" in text


def test_pairing_across_runs_uses_each_runs_own_condition():
    # two runs that share their source segmenters (identical source rows); the same arm name
    # means different data in each, and only the common seeds pair
    run_a = _rows("source", [0.50, 0.60, 0.70]) + _rows("source+aligned", [0.55, 0.64, 0.76])
    run_b = _rows("source", [0.50, 0.60, 0.70]) + _rows("source+aligned", [0.52, 0.63], (0, 1))
    d = paired_across(run_a, "source+aligned", run_b, "source+aligned")
    assert d["seeds"] == 2
    assert d["dice_values"] == pytest.approx([3.0, 1.0])
    assert d["dice"] == pytest.approx(2.0) and d["iou"] == pytest.approx(1.0)
    assert d["dice_ci"][0] < 2.0 < d["dice_ci"][1]
    assert d["shared_max_diff"] == pytest.approx(0.0)


def test_pairing_across_runs_reports_diverging_source_rows():
    run_a = _rows("source", [0.50, 0.60, 0.70]) + _rows("x", [0.5, 0.5, 0.5])
    run_b = _rows("source", [0.50, 0.62, 0.70]) + _rows("y", [0.4, 0.4, 0.4])
    d = paired_across(run_a, "x", run_b, "y")
    assert d["dice"] == pytest.approx(10.0) and d["dice_ci"] == pytest.approx([10.0, 10.0])
    assert d["shared_max_diff"] == pytest.approx(2.0)
    assert paired_across(run_a[3:], "x", run_b, "y")["shared_max_diff"] is None


def test_faithfulness_shows_the_spread_over_replicates_when_graded():
    rows = _rows("source", [0.50, 0.60, 0.70])
    first = {"aligned": {"source_segmenter": 0.70, "oracle_segmenter": 0.80}}
    record = {
        "summary": summarise(rows),
        "distances_to_target_test": {},
        "faithfulness_dice": first,
        "mask_statistics": {
            "source real": {"1": {"area_mean": 0.3, "area_std": 0.1, "pairwise_dice": 0.4}}
        },
        "faithfulness_reference": {"source_segmenter_on_target_test": 0.6},
    }
    assert "| aligned | 0.700 | 0.800 |" in markdown(record)
    record["faithfulness_by_seed"] = {
        "0": first,
        "1": {"aligned": {"source_segmenter": 0.50, "oracle_segmenter": 0.60}},
        "2": {"aligned": {"source_segmenter": 0.60, "oracle_segmenter": 0.85}},
    }
    text = markdown(record)
    assert "| aligned | 0.700; 0.600 [0.500, 0.700] | 0.800; 0.750 [0.600, 0.850] |" in text
    assert "mean [min, max] over 3 replicates" in text
