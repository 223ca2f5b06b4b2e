import json
import math

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medflow.data.fingerprint import Fingerprint, fingerprint_dataset
from medflow.data.layout import load_dataset
from medflow.errors import DataError

SPACING = (0.5, 0.5, 2.0)


def _write(root, cases, channels=("CT", "T1"), labels=None):
    """A tiny nnU-Net raw v2 dataset of NIfTI volumes; ``cases`` maps case id to
    ``(image (C, X, Y, Z), label (X, Y, Z))``."""
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True, exist_ok=True)
    affine = np.diag([*SPACING, 1.0])
    for case, (image, label) in cases.items():
        for c in range(image.shape[0]):
            path = root / "imagesTr" / f"{case}_{c:04d}.nii.gz"
            nib.save(nib.Nifti1Image(image[c].astype(np.float32), affine), str(path))
        nib.save(
            nib.Nifti1Image(label.astype(np.uint8), affine),
            str(root / "labelsTr" / f"{case}.nii.gz"),
        )
    meta = {
        "channel_names": {str(i): n for i, n in enumerate(channels)},
        "labels": labels or {"background": 0, "organ": 1, "spot": 2},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def known(tmp_path):
    """Two cases of (8, 7, 5) voxels with a zero border (nonzero box 6 x 5 x 3), a 2x2x2
    organ (label 1) and spots (label 2): in case a two voxels touching at a corner (one
    object with full connectivity) plus one apart, in case b none. Foreground intensities
    of channel 0 are 1..k, channel 1 ten times that."""
    cases = {}
    fg_values = []
    for name, spots in (("a", [(5, 5, 3), (6, 6, 2), (1, 5, 1)]), ("b", [])):
        label = np.zeros((8, 7, 5), dtype=np.uint8)
        label[1:3, 1:3, 1:3] = 1
        for s in spots:
            label[s] = 2
        image = np.zeros((2, 8, 7, 5), dtype=np.float32)
        image[:, 1:7, 1:6, 1:4] = -5.0  # nonzero box, background of the body
        fg = np.flatnonzero(label.ravel() > 0)
        start = len(fg_values) + 1
        values = np.arange(start, start + fg.size, dtype=np.float32)
        fg_values.extend(values.tolist())
        image[0].reshape(-1)[fg] = values
        image[1].reshape(-1)[fg] = 10 * values
        cases[name] = (image, label)
    return _write(tmp_path / "ds", cases), np.array(fg_values)


def test_fingerprint_of_a_hand_written_dataset(known):
    root, fg = known
    fp = fingerprint_dataset(load_dataset(root))
    assert [c.case_id for c in fp.cases] == ["a", "b"]
    assert fp.cases[0].shape == (8, 7, 5) and fp.cases[0].spacing == SPACING
    # the nonzero box: the body block x 1..6, y 1..5, z 1..3 (spots outside it extend it)
    assert fp.cases[1].crop_shape == (6, 5, 3)
    assert fp.cases[0].crop_shape == (6, 6, 3)
    assert fp.schemes == ("ct", "zscore") and fp.channel_names == ("CT", "T1")
    assert fp.dims == 3 and fp.foreground_stats
    ct, t1 = fp.intensity
    assert ct.n_samples == fg.size == 19  # 8 + 3 + 8 foreground voxels, all drawn
    assert ct.mean == pytest.approx(fg.mean()) and ct.std == pytest.approx(fg.std())
    assert ct.median == pytest.approx(np.median(fg))
    assert ct.p00_5 == pytest.approx(np.percentile(fg, 0.5))
    assert ct.p99_5 == pytest.approx(np.percentile(fg, 99.5))
    assert (ct.min, ct.max) == (1.0, 19.0)
    assert t1.mean == pytest.approx(10 * fg.mean())
    # class voxels over both label maps: 2 * 280 voxels
    assert fp.class_voxels == (2 * 280 - 19, 16, 3)
    assert fp.class_frequency[2] == pytest.approx(3 / 560)


def test_objects_have_sizes_in_voxels_mm_and_diameters(known):
    root, _ = known
    fp = fingerprint_dataset(load_dataset(root))
    organ, spot = fp.objects
    assert (organ.name, organ.value, organ.cases_with) == ("organ", 1, 2)
    voxel_mm3 = 0.5 * 0.5 * 2.0
    assert organ.voxels == (8, 8)
    assert organ.size_mm == pytest.approx((8 * voxel_mm3,) * 2)
    assert organ.diameter_mm[0] == pytest.approx((6 * 8 * voxel_mm3 / math.pi) ** (1 / 3))
    # corner-touching voxels are one object (full connectivity), the far one another
    assert sorted(spot.voxels) == [1, 2] and spot.cases_with == 1 and spot.count == 2
    assert spot.median_diameter_mm == pytest.approx(np.median(spot.diameter_mm))
    # voxel-weighted: the 2-voxel object holds 2 of the 3 voxels
    assert spot.typical_diameter_mm == pytest.approx(max(spot.diameter_mm))


def test_sampling_is_bounded_and_seeded(known):
    root, _ = known
    spec = load_dataset(root)
    a = fingerprint_dataset(spec, samples=6, seed=3)
    assert a.intensity[0].n_samples == 6  # 3 per case
    assert a == fingerprint_dataset(spec, samples=6, seed=3)
    others = {fingerprint_dataset(spec, samples=6, seed=s).intensity[0].mean for s in range(6)}
    assert len(others) > 1
    with pytest.raises(ValueError, match="samples"):
        fingerprint_dataset(spec, samples=0)


def test_round_trip_through_json(known):
    root, _ = known
    fp = fingerprint_dataset(load_dataset(root))
    again = Fingerprint.from_dict(json.loads(json.dumps(fp.to_dict())))
    assert again == fp
    assert again.objects[1].typical_diameter_mm == fp.objects[1].typical_diameter_mm


def test_no_foreground_uses_every_voxel(tmp_path):
    image = np.full((1, 4, 4, 2), 3.0, dtype=np.float32)
    image[0, 0, 0, 0] = 7.0
    root = _write(
        tmp_path / "ds",
        {"a": (image, np.zeros((4, 4, 2)))},
        channels=("MR",),
        labels={"background": 0, "x": 1},
    )
    fp = fingerprint_dataset(load_dataset(root))
    assert not fp.foreground_stats
    assert fp.intensity[0].n_samples == 32 and fp.intensity[0].max == 7.0
    assert fp.objects[0].count == 0 and fp.objects[0].typical_diameter_mm is None


def test_png_objects_are_areas_and_discs(tmp_path):
    root = tmp_path / "png"
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True)
    label = np.zeros((10, 12), dtype=np.uint8)
    label[2:5, 3:6] = 1
    Image.fromarray((label * 100 + 20).astype(np.uint8)).save(root / "imagesTr" / "p_0000.png")
    Image.fromarray(label).save(root / "labelsTr" / "p.png")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "microscopy"},
                "labels": {"background": 0, "cell": 1},
                "numTraining": 1,
                "file_ending": ".png",
            }
        )
    )
    fp = fingerprint_dataset(load_dataset(root))
    assert fp.dims == 2 and fp.cases[0].shape == (10, 12, 1)
    cell = fp.objects[0]
    assert cell.voxels == (9,) and cell.size_mm == (9.0,)  # mm^2 at unit spacing
    assert cell.diameter_mm[0] == pytest.approx(2 * math.sqrt(9 / math.pi))
    assert fp.intensity[0].mean == pytest.approx(120.0)


def test_undeclared_label_value_is_named(known):
    root, _ = known
    lab = nib.load(str(root / "labelsTr" / "b.nii.gz"))
    data = np.asarray(lab.dataobj).copy()
    data[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(data, lab.affine), str(root / "labelsTr" / "b.nii.gz"))
    with pytest.raises(DataError, match=r"b\.nii\.gz: holds label value 5"):
        fingerprint_dataset(load_dataset(root))
