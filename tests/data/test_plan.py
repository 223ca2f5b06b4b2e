import json
import math

import pytest

from medflow.data.fingerprint import CaseFingerprint, ChannelStats, ClassObjects, Fingerprint
from medflow.data.plan import (
    ACTIVATION_FACTOR,
    CPU_PIXELS_PER_STEP,
    MAX_LEVELS,
    Plan,
    estimate_memory_bytes,
    level_channels,
    max_batch,
    plan_from_fingerprint,
    read_plan,
    write_plan,
)
from medflow.data.transforms import scheme_for
from medflow.errors import DataError


def _stats(name, mean=100.0, std=20.0, lo=40.0, hi=180.0):
    return ChannelStats(name, scheme_for(name), mean, std, mean, lo, hi, lo - 1, hi + 1, 1000)


def _objects(name, value, diameters, dim=3):
    sizes = [math.pi / 6 * d**3 if dim == 3 else math.pi / 4 * d**2 for d in diameters]
    return ClassObjects(
        name, value, tuple(max(1, round(s)) for s in sizes), tuple(sizes), tuple(diameters), 1
    )


def _fingerprint(name, cases, channels, classes, class_voxels, objects, dims=3):
    return Fingerprint(
        name=name,
        channel_names=tuple(c.name for c in channels),
        class_names=classes,
        cases=tuple(
            CaseFingerprint(f"c{i:02d}", shape, spacing, crop)
            for i, (shape, spacing, crop) in enumerate(cases)
        ),
        intensity=tuple(channels),
        class_voxels=class_voxels,
        objects=objects,
        dims=dims,
    )


def ct_fingerprint():
    """Abdominal CT: 30 scans of 512 x 512 x 60..89 at 0.63 x 0.63 x 5 mm (air is -1024, so
    the nonzero box is the whole scan); liver 3 %, tumours 0.1 % of the voxels."""
    cases = [((512, 512, 60 + i), (0.63, 0.63, 5.0), (512, 512, 60 + i)) for i in range(30)]
    total = sum(512 * 512 * (60 + i) for i in range(30))
    return _fingerprint(
        "ct-liver",
        cases,
        [_stats("CT", mean=95.0, std=45.0, lo=-60.0, hi=210.0)],
        ("background", "liver", "tumour"),
        (int(total * 0.969), int(total * 0.03), int(total * 0.001)),
        (_objects("liver", 1, [150.0] * 30), _objects("tumour", 2, [8.0, 12.0, 20.0, 35.0])),
    )


def png_fingerprint():
    """Twelve 2D microscopy PNGs of 96 x 128 px, nuclei (about 10 px) on 20 % of the pixels."""
    cases = [((96, 128, 1), (1.0, 1.0, 1.0), (96, 128, 1)) for _ in range(12)]
    total = 12 * 96 * 128
    return _fingerprint(
        "png-nuclei",
        cases,
        [_stats("microscopy")],
        ("background", "nucleus"),
        (int(total * 0.8), int(total * 0.2)),
        (_objects("nucleus", 1, [10.0] * 200, dim=2),),
        dims=2,
    )


def mri_fingerprint():
    """Brain tumour MRI (BraTS-like): 40 cases of 240 x 240 x 155 at 1 mm, four channels,
    brain box about 140 x 170 x 130; three tumour classes of 0.2-1.5 %."""
    cases = [((240, 240, 155), (1.0, 1.0, 1.0), (136 + i % 9, 166 + i % 9, 130)) for i in range(40)]
    total = 40 * 240 * 240 * 155
    return _fingerprint(
        "mri-tumour",
        cases,
        [_stats(n, mean=500.0 + 100 * i) for i, n in enumerate(("T1", "T1ce", "T2", "FLAIR"))],
        ("background", "necrosis", "oedema", "enhancing"),
        (int(total * 0.979), int(total * 0.002), int(total * 0.015), int(total * 0.004)),
        (
            _objects("necrosis", 1, [15.0, 25.0]),
            _objects("oedema", 2, [40.0, 60.0]),
            _objects("enhancing", 3, [20.0, 30.0]),
        ),
    )


@pytest.fixture(scope="module")
def plans():
    return {
        "ct": plan_from_fingerprint(ct_fingerprint(), memory_gib=8.0),
        "png": plan_from_fingerprint(png_fingerprint(), memory_gib=8.0),
        "mri": plan_from_fingerprint(mri_fingerprint(), memory_gib=8.0),
    }


def test_slice_axis_and_spacing(plans):
    ct, png, mri = plans["ct"], plans["png"], plans["mri"]
    assert ct.slice_axis == 2 and ct.reason("slice_axis").startswith("2: anisotropic")
    assert "7.9x the finest 0.63 mm" in ct.reason("slice_axis")
    assert png.slice_axis == 2 and "2D images" in png.reason("slice_axis")
    # isotropic: a tie between all three axes goes to the last (axial)
    assert mri.slice_axis == 2 and "near-isotropic" in mri.reason("slice_axis")
    assert ct.target_spacing == (0.63, 0.63) and png.target_spacing == (1.0, 1.0)
    assert "median in-plane spacing of the 30" in ct.reason("target_spacing")
    assert ct.dims == 3 and png.dims == 2
    # near-isotropic but not a tie: the coarsest axis, here the first
    fp = mri_fingerprint()
    fp = Fingerprint.from_dict(
        {
            **fp.to_dict(),
            "cases": [{**c, "spacing": (1.2, 1.0, 1.0)} for c in fp.to_dict()["cases"]],
        }
    )
    tilted = plan_from_fingerprint(fp)
    assert tilted.slice_axis == 0 and tilted.inplane_axes == (1, 2)
    assert tilted.median_shape == (170, 130)


def test_patch_levels_and_widths(plans):
    ct, png, mri = plans["ct"], plans["png"], plans["mri"]
    # CT: the whole 512 x 512 slice; six levels at most, leaving a 16 px bottleneck
    assert ct.median_shape == (512, 512) and ct.patch_size == (512, 512)
    assert ct.levels == MAX_LEVELS and "capped at 6" in ct.reason("levels")
    # PNG: 96 x 128, halved 4 times to 6 x 8 px, so 5 levels and multiples of 16
    assert png.patch_size == (96, 128) and png.levels == 5
    assert "6 x 8 px bottleneck" in png.reason("levels")
    # MRI: the median brain box 140 x 170 rounded down to multiples of 32
    assert mri.median_shape == (140, 170) and mri.patch_size == (128, 160)
    assert mri.levels == 6 and "4 x 5 px bottleneck" in mri.reason("levels")
    assert "rounded down to multiples of 32" in mri.reason("patch_size")
    assert png.channels == (32, 64, 128, 256, 512) and ct.channels == level_channels(6)
    assert ct.channels[-1] == 512 and "at most 512" in ct.reason("channels")


def test_batch_size_from_memory_or_from_the_data(plans):
    ct, png, mri = plans["ct"], plans["png"], plans["mri"]
    # CT: memory is the bound, the batch is the most that fits 8 GiB
    assert ct.batch_size == max_batch(ct.patch_size, ct.channels, 8.0) == 2
    assert ct.reason("batch_size").startswith("2: the most that fits 8 GiB")
    assert ct.estimated_memory_gib <= 8.0
    assert estimate_memory_bytes(ct.patch_size, ct.channels, 3) > 8 * 2**30
    # 12 small images: 5 % of their pixels is under one patch; nnU-Net's floor of 2
    assert png.batch_size == 2 and "5% of the" in png.reason("batch_size")
    assert mri.batch_size == max_batch(mri.patch_size, mri.channels, 8.0)
    assert mri.batch_size > ct.batch_size


def test_a_cpu_plan_caps_the_pixels_per_step():
    gpu = plan_from_fingerprint(mri_fingerprint(), memory_gib=8.0)
    cpu = plan_from_fingerprint(mri_fingerprint(), memory_gib=8.0, compute="cpu")
    pixels = cpu.patch_size[0] * cpu.patch_size[1]
    # 128 x 160 patches: 7 of them carry at most 16 slices of 96 x 96
    assert cpu.batch_size == CPU_PIXELS_PER_STEP // pixels == 7 < gpu.batch_size
    assert cpu.compute == "cpu" and gpu.compute == "gpu"
    assert f"the GPU rule gives {gpu.batch_size}" in cpu.reason("batch_size")
    # everything but the batch (and what is computed from it) is the same plan
    same = ("patch_size", "levels", "channels", "slice_axis", "target_spacing")
    assert all(getattr(cpu, f) == getattr(gpu, f) for f in same)
    # a batch already below the CPU cap is left alone (12 small PNGs: nnU-Net's floor of 2)
    assert plan_from_fingerprint(png_fingerprint(), compute="cpu").batch_size == 2
    # the CT's 512 x 512 patch is above the cap alone: the floor of 2 holds
    assert plan_from_fingerprint(ct_fingerprint(), compute="cpu").batch_size == 2
    # plan for another machine by override; an explicit batch still wins over both rules
    overridden = plan_from_fingerprint(mri_fingerprint(), overrides={"compute": "cpu"})
    assert overridden.batch_size == cpu.batch_size and "override" in overridden.reason("compute")
    fixed = plan_from_fingerprint(mri_fingerprint(), compute="cpu", overrides={"batch_size": 20})
    assert fixed.batch_size == 20 and "the rule gave 7" in fixed.reason("batch_size")
    with pytest.raises(ValueError, match="'compute': 'tpu' is not one of gpu, cpu"):
        plan_from_fingerprint(mri_fingerprint(), overrides={"compute": "tpu"})
    # plans written before the field existed were planned by the GPU rules
    old = {k: v for k, v in cpu.to_dict().items() if k != "compute"}
    assert Plan.from_dict(old).compute == "gpu"


def test_normalisation(plans):
    ct, png, mri = plans["ct"], plans["png"], plans["mri"]
    assert ct.normalisation == ("ct",) and ct.ct_stats == ((-60.0, 210.0, 95.0, 45.0),)
    assert "clip to the foreground -60 / 210" in ct.reason("normalisation")
    assert "Hounsfield" in ct.reason("normalisation")
    assert mri.normalisation == ("zscore",) * 4 and mri.ct_stats == ()
    assert mri.reason("normalisation").count("z-score per image") == 4
    assert "channel 3 'FLAIR'" in mri.reason("normalisation")
    assert png.normalisation == ("zscore",) and png.reason("ct_stats") == "(): no ct channel"


def test_sampling(plans):
    ct, png, mri = plans["ct"], plans["png"], plans["mri"]
    for plan in plans.values():
        assert plan.foreground_fraction == pytest.approx(1 / 3) and plan.context_slices == 0
        assert "nnU-Net's oversampling" in plan.reason("foreground_fraction")
    assert ct.class_balanced and "'tumour' is rare (0.10% of voxels)" in ct.reason("class_balanced")
    assert "'liver'" not in ct.reason("class_balanced")
    assert mri.class_balanced and "'necrosis' is rare" in mri.reason("class_balanced")
    assert not png.class_balanced and png.reason("class_balanced").startswith("false")


def test_small_objects_are_balanced_even_when_frequent():
    fp = png_fingerprint()
    tiny = _objects("nucleus", 1, [4.0] * 200, dim=2)  # 4 px, under 96 / 16 = 6 px
    plan = plan_from_fingerprint(Fingerprint(**{**fp.__dict__, "objects": (tiny,)}))
    assert plan.class_balanced
    assert "'nucleus' is small (typical object 4 mm across" in plan.reason("class_balanced")


def test_every_field_has_one_reason(plans):
    for plan in plans.values():
        names = [line.split(": ", 1)[0] for line in plan.reasons]
        assert len(names) == len(set(names))
        expected = {f for f in plan.to_dict() if f not in ("dataset", "dims", "reasons")}
        assert set(names) == expected - {"memory_gib", "estimated_memory_gib"}


def test_memory_estimate_formula_and_monotonicity():
    # (8 x 8) patch, widths 2 and 4, batch 3: values 2*64 + 4*16 = 192 per sample
    activations = 3 * 192 * ACTIVATION_FACTOR * 4
    weights = 8 * 9 * (2 * 2 + 4 * 4) * 5 * 4
    assert estimate_memory_bytes((8, 8), (2, 4), 3) == activations + weights
    base = estimate_memory_bytes((64, 64), (8, 16, 32), 4)
    assert estimate_memory_bytes((64, 96), (8, 16, 32), 4) > base
    assert estimate_memory_bytes((64, 64), (8, 16, 64), 4) > base
    assert estimate_memory_bytes((64, 64), (8, 16, 32), 5) > base


def test_plan_grows_with_the_budget_and_respects_it():
    fp = ct_fingerprint()
    previous = None
    for gib in (1.0, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0):
        plan = plan_from_fingerprint(fp, memory_gib=gib)
        assert plan.estimated_memory_gib <= gib
        assert plan.batch_size >= 2
        area = plan.patch_size[0] * plan.patch_size[1]
        if previous is not None:
            assert area >= previous[0]
            assert area > previous[0] or plan.batch_size >= previous[1]
        previous = (area, plan.batch_size)
    small = plan_from_fingerprint(fp, memory_gib=2.0)
    assert small.patch_size[0] * small.patch_size[1] < 512 * 512
    assert "shrunk along the axis largest" in small.reason("patch_size")
    # a fixed patch: the batch alone follows the budget, and the next batch would not fit
    batches = []
    for gib in (2.0, 4.0, 8.0, 16.0):
        plan = plan_from_fingerprint(fp, memory_gib=gib, overrides={"patch_size": (256, 256)})
        assert estimate_memory_bytes(plan.patch_size, plan.channels, plan.batch_size + 1) > (
            gib * 2**30
        )
        batches.append(plan.batch_size)
    assert batches == sorted(batches) and batches[0] < batches[-1]


def test_a_budget_too_small_is_named():
    with pytest.raises(ValueError, match="plan field 'memory_gib': 0.0001 GiB cannot hold"):
        plan_from_fingerprint(ct_fingerprint(), memory_gib=0.0001)
    with pytest.raises(ValueError, match="'memory_gib'"):
        plan_from_fingerprint(ct_fingerprint(), memory_gib=-1)


def test_overrides_replace_a_choice_and_later_choices_follow():
    fp = ct_fingerprint()
    rule = plan_from_fingerprint(fp)
    plan = plan_from_fingerprint(fp, overrides={"patch_size": "128,128"})
    assert plan.patch_size == (128, 128) and plan.levels == 6
    assert plan.reason("patch_size") == "128 x 128 px: set by override"
    assert plan.batch_size > rule.batch_size
    plan = plan_from_fingerprint(fp, overrides={"patch_size": (64, 64)})
    assert plan.levels == 5  # 64 px halved 4 times is 4 px
    plan = plan_from_fingerprint(fp, overrides={"levels": "4"})
    assert plan.channels == (32, 64, 128, 256) and plan.patch_size == (512, 512)
    assert plan.reason("levels").startswith("4: set by override")
    plan = plan_from_fingerprint(fp, overrides={"channels": (16, 32, 64)})
    assert plan.levels == 3 and plan.channels == (16, 32, 64)
    plan = plan_from_fingerprint(fp, overrides={"batch_size": 64})
    assert plan.batch_size == 64 and "ABOVE the 8 GiB budget" in plan.reason("batch_size")
    plan = plan_from_fingerprint(fp, overrides={"target_spacing": "1.26,1.26"})
    assert plan.median_shape == (256, 256) and plan.patch_size == (256, 256)
    plan = plan_from_fingerprint(fp, overrides={"memory_gib": "16"})
    assert plan.memory_gib == 16.0 and plan.batch_size > rule.batch_size
    plan = plan_from_fingerprint(fp, overrides={"class_balanced": "false"})
    assert plan.class_balanced is False
    assert "set by override (the rule gave true)" in plan.reason("class_balanced")
    mri = plan_from_fingerprint(
        mri_fingerprint(), overrides={"normalisation": "ct,zscore,zscore,zscore"}
    )
    assert mri.ct_stats == ((40.0, 180.0, 500.0, 20.0),)
    axial = plan_from_fingerprint(mri_fingerprint(), overrides={"slice_axis": 0})
    assert axial.slice_axis == 0 and axial.median_shape == (170, 130)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"patchsize": 64}, "unknown plan field 'patchsize'"),
        ({"median_shape": (8, 8)}, "'median_shape' is computed from the data"),
        ({"levels": "x"}, "plan field 'levels': 'x' is not an integer"),
        ({"levels": 0}, "plan field 'levels': 0 must be between 1 and 10"),
        (
            {"patch_size": "100,100"},
            "plan field 'patch_size': 100 x 100 is not a multiple of 16 .2\\^.levels-1. for 5",
        ),
        ({"patch_size": "64"}, "plan field 'patch_size'.*needs 2 values"),
        ({"target_spacing": "-1,1"}, "plan field 'target_spacing': -1 must be above 0"),
        ({"normalisation": "hu"}, "plan field 'normalisation': 'hu' is not one of"),
        ({"normalisation": "ct,ct"}, "plan field 'normalisation': 2 schemes for 1 channel"),
        ({"foreground_fraction": 2}, "plan field 'foreground_fraction': 2 must be in"),
        ({"class_balanced": "maybe"}, "plan field 'class_balanced': 'maybe' is not true"),
        ({"slice_axis": 3}, "plan field 'slice_axis': 3 must be between 0 and 2"),
        ({"channels": (8, 16), "levels": 3}, "plan field 'channels': 2 widths for levels 3"),
    ],
)
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        plan_from_fingerprint(ct_fingerprint(), overrides=overrides)


def test_2d_images_refuse_another_slice_axis_and_context():
    with pytest.raises(ValueError, match="'slice_axis': 0 lies in the plane"):
        plan_from_fingerprint(png_fingerprint(), overrides={"slice_axis": 0})
    with pytest.raises(ValueError, match="'context_slices': 2D images"):
        plan_from_fingerprint(png_fingerprint(), overrides={"context_slices": 1})


def test_round_trip_and_files(plans, tmp_path):
    for plan in plans.values():
        assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    path = write_plan(tmp_path / "plans.json", plans["ct"])
    assert json.loads(path.read_text())["format"] == "medflow-plan-v1"
    assert read_plan(path) == plans["ct"]
    assert not list(tmp_path.glob(".*partial*"))
    with pytest.raises(DataError, match="plan file not found"):
        read_plan(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"format": "something"}')
    with pytest.raises(DataError, match="is not a medflow plan"):
        read_plan(tmp_path / "other.json")
    edited = {**json.loads(path.read_text()), "levels": 4}
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(DataError, match="'channels': 6 widths for 4 levels"):
        read_plan(tmp_path / "edited.json")
    with pytest.raises(ValueError, match="unknown plan field 'extra'"):
        Plan.from_dict({**plans["ct"].to_dict(), "extra": 1})


def test_every_plan_field_has_a_parser():
    import dataclasses

    from medflow.data.plan_fields import FIELDS

    assert list(FIELDS) == [f.name for f in dataclasses.fields(Plan)]
