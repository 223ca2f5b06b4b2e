"""Several references per case: hand-computed distances, GED, matched IoU and soft-label
calibration; the folder evaluation end to end and through the CLI."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medflow import cli
from medflow.errors import DataError, OptionError, OutputExistsError
from medflow.metrics import ambiguity as amb
from medflow.metrics.ambiguity_summary import evaluate_ambiguity, rater_files
from medflow.metrics.summary import evaluate_folders

A = np.array([[1, 1, 0, 0]])
B = np.array([[0, 0, 1, 1]])
EMPTY = np.zeros((1, 4), dtype=int)


# ----------------------------------------------------------------------------- distance


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (EMPTY, EMPTY, 0.0),  # both empty: IoU 1
        (EMPTY, A, 1.0),  # missed structure: IoU 0
        (A, EMPTY, 1.0),  # false structure: IoU 0
        (A, [[0, 1, 1, 0]], 2 / 3),  # 1 voxel shared of 3 in the union
        (A, B, 1.0),  # disjoint
        (A, A, 0.0),
    ],
)
def test_iou_distance_of_one_class_by_hand(a, b, expected):
    assert amb.iou_distance(np.array(a), np.array(b), [1]) == pytest.approx(expected)


def test_iou_distance_averages_classes_and_a_class_absent_from_both_counts_one():
    # class 1: 1 of 2, class 2: 1 of 2 -> IoU 0.5 each
    assert amb.iou_distance(
        np.array([1, 1, 2, 0]), np.array([1, 0, 2, 2]), [1, 2]
    ) == pytest.approx(0.5)
    # class 1: IoU 1/3; class 2 in neither map: IoU 1 -> d = 1 - (1/3 + 1) / 2
    assert amb.iou_distance(A, np.array([[0, 1, 1, 0]]), [1, 2]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="differs"):
        amb.iou_distance(A, A[:, :3], [1])
    with pytest.raises(ValueError, match="classes is empty"):
        amb.iou_distance(A, A, [])


def test_distance_matrix_agrees_with_iou_distance_across_voxel_blocks(monkeypatch):
    rng = np.random.default_rng(1)
    a = [rng.integers(0, 3, (5, 4, 3)) for _ in range(3)]
    b = [rng.integers(0, 3, (5, 4, 3)) for _ in range(2)] + [np.zeros((5, 4, 3), int)]
    monkeypatch.setattr(amb, "_BLOCK", 7)  # 60 voxels in 9 blocks, the last one short
    d = amb.distance_matrix(a, b, [1, 2])
    expected = [[amb.iou_distance(x, y, [1, 2]) for y in b] for x in a]
    np.testing.assert_allclose(d, expected, rtol=0, atol=1e-12)
    # one pass over both sets (the set-against-itself shortcut) gives the same three blocks
    d_sy, d_ss, d_yy = amb.pairwise_distances(a, b, [1, 2])
    np.testing.assert_allclose(d_sy, d, rtol=0, atol=1e-12)
    np.testing.assert_allclose(d_ss, amb.distance_matrix(a, list(a), [1, 2]), atol=1e-12)
    np.testing.assert_allclose(d_yy, [[amb.iou_distance(x, y, [1, 2]) for y in b] for x in b])
    with pytest.raises(ValueError, match="shape"):
        amb.distance_matrix(a, [b[0][:4]], [1])


# ---------------------------------------------------------------------------------- GED


def test_ged_by_hand():
    # d(A, A) = 0, d(B, A) = 1: cross 1/2; samples' 2 x 2 matrix [[0, 1], [1, 0]]: 1/2
    g = amb.ged([A, B], [A], [1])
    assert (g.cross, g.sample_diversity, g.ref_diversity) == pytest.approx((0.5, 0.5, 0.0))
    assert g.ged2 == pytest.approx(2 * 0.5 - 0.5 - 0.0)
    # one sample: defined (the V-statistic), 2 d(S, Y) - 0 - 0
    assert amb.ged([B], [A], [1]).ged2 == pytest.approx(2.0)


def test_ged_of_a_set_against_itself_and_of_one_identical_map_is_zero():
    g = amb.ged([A, B, EMPTY], [A, B, EMPTY], [1])
    assert g.ged2 == pytest.approx(0.0, abs=1e-12)
    assert g.cross == pytest.approx(g.sample_diversity)  # 6 of 9 pairs at d = 1
    assert g.cross == pytest.approx(6 / 9)
    single = amb.ged([A], [A], [1])
    assert single == amb.GEDResult(0.0, 0.0, 0.0, 0.0)


def test_ged_all_pairs_estimate_is_never_negative():
    rng = np.random.default_rng(2)
    for _ in range(20):
        s = [rng.integers(0, 3, (3, 3)) for _ in range(int(rng.integers(1, 5)))]
        r = [rng.integers(0, 3, (3, 3)) for _ in range(int(rng.integers(1, 5)))]
        assert amb.ged(s, r, [1, 2]).ged2 >= -1e-12


def test_diversity_is_the_off_diagonal_mean():
    assert amb.diversity([A, A, A], [1]) == 0.0
    assert amb.diversity([A], [1]) == 0.0
    # pairs (A, B) = 1, (A, E) = 1, (B, E) = 1: all 1; the GED term is 6/9 of that
    assert amb.diversity([A, B, EMPTY], [1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one"):
        amb.diversity([], [1])


def test_matched_iou_two_samples_against_four_references_by_hand():
    r1, r2 = A, np.array([[1, 0, 0, 0]])  # IoU with A: 1, 1/2; with B: 0, 0
    r3, r4 = B, np.array([[0, 0, 0, 1]])  # IoU with A: 0, 0;   with B: 1, 1/2
    # lcm(2, 4) = 4: each sample matched twice, each reference once; best: A-r1, A-r2, B-r3,
    # B-r4 -> (1 + 1/2 + 1 + 1/2) / 4
    assert amb.matched_iou([A, B], [r1, r2, r3, r4], [1]) == pytest.approx(0.75)
    # the same sets the other way round
    assert amb.matched_iou([r1, r2, r3, r4], [A, B], [1]) == pytest.approx(0.75)
    # one sample meets every reference once: the mean IoU (1 + 1/2 + 0 + 0) / 4
    assert amb.matched_iou([A], [r1, r2, r3, r4], [1]) == pytest.approx(0.375)


def test_matched_iou_does_not_match_one_reference_twice():
    # both samples equal r1; r2 is far from both: a greedy best match would give 1, the
    # one-to-one matching must use r2 for one of them: (1 + 0) / 2
    assert amb.matched_iou([A, A], [A, B], [1]) == pytest.approx(0.5)


def test_rater_floor_slices_the_fresh_raters():
    refs, fresh = [A, B], [A, B, A, B]
    floor = amb.rater_floor(refs, fresh, [1], samples=(1, 2, 4))
    assert list(floor) == [1, 2, 4]
    assert floor[2].ged2 == pytest.approx(0.0)  # the first two fresh raters are the refs
    assert floor[4].ged2 == pytest.approx(0.0)
    assert floor[1] == amb.ged([A], refs, [1])
    assert floor[1].ged2 == pytest.approx(2 * 0.5 - 0 - 0.5)
    with pytest.raises(ValueError, match="1..4"):
        amb.rater_floor(refs, fresh, [1], samples=(8,))


# --------------------------------------------------------------------------- calibration


def _soft(p1, p2=None):
    """``(2, N)`` probabilities of one foreground class, or ``(3, N)`` of two."""
    p1 = np.asarray(p1, dtype=float)
    if p2 is None:
        return np.stack([1 - p1, p1])
    p2 = np.asarray(p2, dtype=float)
    return np.stack([1 - p1 - p2, p1, p2])


# the fifth voxel is certain background in the truth and wrong in the prediction: outside
P = _soft([0.1, 0.2, 0.8, 0.9, 0.5])
Q = _soft([0.05, 0.4, 0.8, 0.6, 0.0])


def test_soft_region_leaves_out_certain_background():
    np.testing.assert_array_equal(amb.soft_region(Q), [True, True, True, True, False])


def test_calibration_is_zero_for_the_true_probabilities():
    region = amb.soft_region(Q)
    assert amb.soft_ece(Q, Q, region) == 0.0
    assert amb.brier(Q, Q, region) == 0.0
    assert amb.prob_mae(Q, Q, region) == 0.0


def test_calibration_by_hand():
    region = amb.soft_region(Q)
    # 2 bins: {0.1, 0.2} vs truth {0.05, 0.4}: |0.15 - 0.225| = 0.075, weight 2/4;
    # {0.8, 0.9} vs {0.8, 0.6}: |0.85 - 0.7| = 0.15, weight 2/4
    assert amb.soft_ece(P, Q, region, bins=2) == pytest.approx(0.5 * 0.075 + 0.5 * 0.15)
    # one bin: |mean p - mean q| = |0.5 - 0.4625|
    assert amb.soft_ece(P, Q, region, bins=1) == pytest.approx(0.0375)
    # class-1 errors 0.05, -0.2, 0, 0.3, mirrored in the background channel
    assert amb.brier(P, Q, region) == pytest.approx(2 * (0.0025 + 0.04 + 0 + 0.09) / 4)
    assert amb.prob_mae(P, Q, region) == pytest.approx((0.05 + 0.2 + 0 + 0.3) / 4)


def test_calibration_averages_the_foreground_classes():
    # a second foreground class predicted exactly: ECE and MAE halve, Brier stays
    p3 = _soft([0.1, 0.2, 0.8, 0.9, 0.5], [0.0] * 5)
    q3 = _soft([0.05, 0.4, 0.8, 0.6, 0.0], [0.0] * 5)
    region = amb.soft_region(q3)
    assert amb.soft_ece(p3, q3, region, bins=2) == pytest.approx(0.1125 / 2)
    assert amb.prob_mae(p3, q3, region) == pytest.approx(0.1375 / 2)
    assert amb.brier(p3, q3, region) == pytest.approx(amb.brier(P, Q, amb.soft_region(Q)))


def test_calibration_edge_cases():
    # p = 1 lands in the last bin, not one past it
    one = _soft([1.0, 1.0])
    assert amb.soft_ece(one, _soft([0.5, 0.5]), np.array([True, True])) == pytest.approx(0.5)
    nowhere = np.zeros(5, dtype=bool)
    assert (amb.soft_ece(P, Q, nowhere), amb.brier(P, Q, nowhere)) == (0.0, 0.0)
    assert amb.prob_mae(P, Q, nowhere) == 0.0
    with pytest.raises(ValueError, match="differs"):
        amb.brier(P, Q[:, :4], amb.soft_region(Q))
    with pytest.raises(ValueError, match="boolean mask"):
        amb.brier(P, Q, np.ones(5))
    with pytest.raises(ValueError, match="bins"):
        amb.soft_ece(P, Q, amb.soft_region(Q), bins=0)


# ------------------------------------------------------------------------- on the disk

SHAPE = (4, 3, 2)
LABELS = {"background": 0, "a": 1, "b": 2}
AFFINE = np.diag([1.0, 2.0, 3.0, 1.0])


def _nifti(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.float32 if array.dtype.kind == "f" else np.uint8
    nib.save(nib.Nifti1Image(array.astype(dtype), AFFINE), str(path))


def _probabilities(rng, certain):
    probs = rng.dirichlet(np.ones(3), size=SHAPE).astype(np.float32)  # (X, Y, Z, K)
    probs[certain] = (1.0, 0.0, 0.0)
    return probs


def _study(tmp_path, n_samples=4):
    """Dataset with 3 raters per case (2 cases), and predictions with ``n_samples`` samples;
    case ``c0`` has both probability maps, ``c1`` only the true one."""
    rng = np.random.default_rng(3)
    ds, pred = tmp_path / "ds", tmp_path / "pred"
    ds.mkdir()
    (ds / "dataset.json").write_text(json.dumps({"labels": LABELS}))
    arrays = {}
    for case in ("c0", "c1"):
        refs = [rng.integers(0, 3, SHAPE) for _ in range(3)]
        samples = [rng.integers(0, 3, SHAPE) for _ in range(n_samples)]
        fused = rng.integers(0, 3, SHAPE)
        certain = rng.random(SHAPE) < 0.4
        truth = _probabilities(rng, certain)
        _nifti(ds / "labelsTs" / f"{case}.nii.gz", refs[0])
        for r in (1, 2):
            _nifti(ds / "ratersTs" / f"{case}_rater{r:02d}.nii.gz", refs[r])
        _nifti(ds / "probabilitiesTs" / f"{case}.nii.gz", truth)
        _nifti(pred / f"{case}.nii.gz", fused)
        for i, s in enumerate(samples):
            _nifti(pred / f"{case}_sample{i:02d}.nii.gz", s)
        probs = None
        if case == "c0":
            probs = _probabilities(rng, rng.random(SHAPE) < 0.2)
            _nifti(pred / f"{case}_probabilities.nii.gz", probs)
        arrays[case] = dict(refs=refs, samples=samples, fused=fused, truth=truth, probs=probs)
    return ds, pred, arrays


def test_rater_files_puts_rater_zero_first(tmp_path):
    ds, _, _ = _study(tmp_path)
    files = rater_files(ds)
    assert list(files) == ["c0", "c1"]
    assert [p.relative_to(ds).as_posix() for p in files["c1"]] == [
        "labelsTs/c1.nii.gz",
        "ratersTs/c1_rater01.nii.gz",
        "ratersTs/c1_rater02.nii.gz",
    ]


def test_evaluate_ambiguity_end_to_end(tmp_path):
    ds, pred, arrays = _study(tmp_path)
    out = tmp_path / "eval"
    res = evaluate_ambiguity(pred, ds, out, samples=(1, 4, 16))
    on_disk = json.loads((out / "ambiguity.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert (on_disk["samples"], on_disk["raters"], on_disk["samples_found"]) == ([1, 4], 3, 4)
    classes = [1, 2]
    for row in on_disk["per_case"]:
        a = arrays[row["case"]]
        for s in (1, 4):
            g = amb.ged(a["samples"][:s], a["refs"], classes)
            expected = {
                "ged2": g.ged2,
                "cross": g.cross,
                "sample_diversity": g.sample_diversity,
                "ref_diversity": g.ref_diversity,
                "diversity": amb.diversity(a["samples"][:s], classes),
                "matched_iou": amb.matched_iou(a["samples"][:s], a["refs"], classes),
            }
            assert row["ged"][str(s)] == pytest.approx(expected)
        dice_a = np.mean(
            [
                2
                * ((a["fused"] == 1) & (r == 1)).sum()
                / ((a["fused"] == 1).sum() + (r == 1).sum())
                for r in a["refs"]
            ]
        )
        assert row["dice"]["a"] == pytest.approx(dice_a)
        assert row["dice_mean"] == pytest.approx(np.mean(list(row["dice"].values())))
    c0, c1 = on_disk["per_case"]
    assert c1["calibration"] is None  # no predicted probabilities for c1
    probs = np.moveaxis(arrays["c0"]["probs"], -1, 0)
    truth = np.moveaxis(arrays["c0"]["truth"], -1, 0)
    region = truth[0] < 1
    assert c0["calibration"] == pytest.approx(
        {
            "ece": amb.soft_ece(probs, truth, region),
            "brier": amb.brier(probs, truth, region),
            "mae": amb.prob_mae(probs, truth, region),
            "region_voxels": int(region.sum()),
        }
    )
    mean = on_disk["mean"]
    assert mean["calibrated_cases"] == 1
    assert mean["calibration"] == pytest.approx(
        {k: c0["calibration"][k] for k in mean["calibration"]}
    )
    assert mean["ged"]["4"]["ged2"] == pytest.approx(
        (c0["ged"]["4"]["ged2"] + c1["ged"]["4"]["ged2"]) / 2
    )
    with open(out / "ambiguity_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["samples"]) for r in rows] == [
        ("c0", "1"),
        ("c0", "4"),
        ("c1", "1"),
        ("c1", "4"),
    ]
    assert float(rows[1]["ged2"]) == pytest.approx(c0["ged"]["4"]["ged2"])
    assert rows[2]["ece"] == ""

    with pytest.raises(OutputExistsError):
        evaluate_ambiguity(pred, ds, out)
    assert evaluate_ambiguity(pred, ds, out, samples=(2,), force=True)["samples"] == [2]


def test_plain_evaluate_skips_samples_and_probabilities_beside_the_masks(tmp_path):
    ds, pred, _ = _study(tmp_path)
    summary = evaluate_folders(pred, ds / "labelsTs", tmp_path / "eval")
    assert [c["case"] for c in summary["per_case"]] == ["c0", "c1"]


def _message(exc_info) -> str:
    return str(exc_info.value)


def test_missing_or_misnumbered_samples_are_named(tmp_path):
    ds, pred, _ = _study(tmp_path)
    (pred / "c1_sample03.nii.gz").unlink()
    with pytest.raises(DataError, match="c1_sample03.nii.gz: not found: 'c0' has 4 samples"):
        evaluate_ambiguity(pred, ds, tmp_path / "e")
    (pred / "c1_sample01.nii.gz").unlink()
    with pytest.raises(DataError, match="c1_sample01.nii.gz: not found, but c1_sample02"):
        evaluate_ambiguity(pred, ds, tmp_path / "e")
    for i in (0, 2):
        (pred / f"c1_sample{i:02d}.nii.gz").unlink()
    with pytest.raises(DataError, match="c1_sample00.nii.gz: not found: no posterior samples"):
        evaluate_ambiguity(pred, ds, tmp_path / "e")
    assert not (tmp_path / "e").exists()  # nothing written


def test_bad_shapes_and_options_are_named(tmp_path):
    ds, pred, _ = _study(tmp_path)
    out = tmp_path / "e"
    with pytest.raises(DataError, match="holds 4 sample"):
        evaluate_ambiguity(pred, ds, out, samples=(8, 16))
    with pytest.raises(OptionError, match="--samples"):
        evaluate_ambiguity(pred, ds, out, samples=(0,))
    _nifti(pred / "c0_probabilities.nii.gz", np.full((*SHAPE, 2), 0.5, np.float32))
    with pytest.raises(DataError, match=r"c0_probabilities.nii.gz: probability map of shape"):
        evaluate_ambiguity(pred, ds, out)
    _nifti(pred / "c0_probabilities.nii.gz", np.full((*SHAPE, 3), 0.5, np.float32))
    with pytest.raises(DataError, match="c0_probabilities.nii.gz: is no probability map"):
        evaluate_ambiguity(pred, ds, out)
    (pred / "c0_probabilities.nii.gz").unlink()
    _nifti(ds / "ratersTs" / "c1_rater02.nii.gz", np.zeros((4, 3, 3), np.uint8))
    with pytest.raises(DataError, match=r"c1_rater02.nii.gz: shape \(4, 3, 3\) differs"):
        evaluate_ambiguity(pred, ds, out)
    (ds / "ratersTs" / "c1_rater02.nii.gz").unlink()
    with pytest.raises(DataError, match="c1_rater02.nii.gz: not found: case 'c1' has 2 annotation"):
        evaluate_ambiguity(pred, ds, out)
    assert not out.exists()


def test_cli_evaluate_with_raters(tmp_path, capsys):
    ds, pred, _ = _study(tmp_path)
    out = tmp_path / "eval"
    argv = ["evaluate", "--pred", str(pred), "--ref", str(ds / "labelsTs"), "--out", str(out)]
    assert cli.main([*argv, "--raters", str(ds), "--samples", "1", "4"]) == 0
    printed = capsys.readouterr().out
    assert "GED^2" in printed and "matched IoU" in printed and "ECE" in printed
    assert json.loads((out / "ambiguity.json").read_text())["samples"] == [1, 4]
    assert (out / "summary.json").is_file()

    (pred / "c0_sample02.nii.gz").unlink()
    bad = tmp_path / "eval2"
    assert cli.main([*argv[:-1], str(bad), "--raters", str(ds)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("medflow evaluate: error: ")
    assert "c0_sample02.nii.gz: not found" in err
    assert not bad.exists()  # neither summary.json nor ambiguity.json
    assert cli.main([*argv[:-1], str(bad), "--samples", "4"]) == 2
    assert "needs --raters" in capsys.readouterr().err


def test_rater_files_are_checked(tmp_path):
    ds, pred, _ = _study(tmp_path)
    raters = ds / "ratersTs"
    (raters / "zz_rater01.nii.gz").write_bytes((raters / "c0_rater01.nii.gz").read_bytes())
    with pytest.raises(DataError, match="zz_rater01.nii.gz: rater annotation has no label"):
        rater_files(ds)
    (raters / "zz_rater01.nii.gz").rename(raters / "c1_rater00.nii.gz")
    with pytest.raises(DataError, match="c1_rater00.nii.gz: rater 0 is the case's label map"):
        rater_files(ds)
    (raters / "c1_rater00.nii.gz").rename(raters / "c1_rater04.nii.gz")
    with pytest.raises(DataError, match="c0_rater03.nii.gz: not found: case 'c0' has 3"):
        rater_files(ds)
    (raters / "c1_rater04.nii.gz").unlink()
    _nifti(pred / "c1_sample01.nii.gz", np.full(SHAPE, 7))
    with pytest.raises(DataError, match=r"c1_sample01.nii.gz: holds label value\(s\) \[7\]"):
        evaluate_ambiguity(pred, ds, tmp_path / "e")
    for path in sorted(raters.iterdir()):
        path.unlink()
    raters.rmdir()
    with pytest.raises(DataError, match="ratersTs: folder not found"):
        rater_files(ds)


def test_unbiased_ged_leaves_the_self_distances_out():
    from medflow.metrics.ambiguity import ged_unbiased_from_distances

    d_sy = np.full((3, 2), 0.5)
    d_ss = np.array([[0.0, 0.2, 0.2], [0.2, 0.0, 0.2], [0.2, 0.2, 0.0]])
    d_yy = np.array([[0.0, 0.4], [0.4, 0.0]])
    # 2 * 0.5 - 0.2 - 0.4 by hand; the all-pairs GED counts the zeros: 1 - 0.4/3 - 0.2
    assert ged_unbiased_from_distances(d_sy, d_ss, d_yy) == pytest.approx(0.4)
    assert amb.ged_from_distances(d_sy, d_ss, d_yy).ged2 == pytest.approx(1 - 0.4 / 3 - 0.2)
    with pytest.raises(ValueError, match="at least two samples"):
        ged_unbiased_from_distances(d_sy[:1], d_ss[:1, :1], d_yy)
