import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from medflow.data.io import atomic_write, file_ending, read_image, read_label, write_volume
from medflow.errors import DataError


def nifti(path, data, affine=None, dtype=np.float32):
    affine = np.diag([2.0, 1.5, 3.0, 1.0]) if affine is None else affine
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    nib.save(img, str(path))
    return path


def test_file_endings():
    assert file_ending("a/b.NII.GZ") == ".nii.gz"
    assert file_ending("x.tiff") == ".tiff"
    with pytest.raises(DataError, match="unsupported file type"):
        file_ending("scan.mha")


def test_nifti_label_written_on_the_input_grid(tmp_path):
    affine = np.array([[0, -2.0, 0, 10], [1.5, 0, 0, -4], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    src = nifti(tmp_path / "img.nii.gz", np.random.rand(6, 5, 4), affine)
    vol = read_image([src])
    assert vol.array.shape == (1, 6, 5, 4) and vol.array.dtype == np.float32
    assert vol.geometry.spacing == (1.5, 2.0, 3.0)  # column norms of the affine
    labels = np.random.randint(0, 3, (6, 5, 4))
    out = write_volume(tmp_path / "pred.nii.gz", labels, vol.geometry)
    back = nib.load(str(out))
    assert back.shape == (6, 5, 4)
    assert np.allclose(back.affine, affine)
    assert back.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(back.dataobj), labels)
    assert np.array_equal(read_label(out).array, labels)


def test_scaled_nifti_label_is_read_as_integers(tmp_path):
    img = nib.Nifti1Image(np.array([[[0, 1], [2, 1]]], dtype=np.int16), np.eye(4))
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(tmp_path / "l.nii"))
    lab = read_label(tmp_path / "l.nii")
    assert lab.array.dtype == np.int16 and lab.array.max() == 2


def test_msd_4d_nifti_gives_channels_first(tmp_path):
    data = np.random.rand(4, 5, 3, 2).astype(np.float32)
    vol = read_image([nifti(tmp_path / "m.nii.gz", data)])
    assert vol.array.shape == (2, 4, 5, 3)
    assert np.allclose(vol.array[1], data[..., 1])


def test_png_grey_rgb_and_label_round_trip(tmp_path):
    grey = (np.arange(20).reshape(4, 5) * 10).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgb = np.random.randint(0, 255, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    g = read_image([tmp_path / "g.png"])
    c = read_image([tmp_path / "c.png"])
    assert g.array.shape == (1, 4, 5, 1) and np.array_equal(g.array[0, :, :, 0], grey)
    assert c.array.shape == (3, 4, 5, 1) and np.array_equal(c.array[2, :, :, 0], rgb[..., 2])
    lab = np.random.randint(0, 2, (4, 5, 1))
    write_volume(tmp_path / "p.png", lab, g.geometry)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png")), lab[:, :, 0])
    assert np.array_equal(read_label(tmp_path / "p.png").array, lab)


def test_tiff_page_and_stack(tmp_path):
    page = np.random.rand(6, 7).astype(np.float32)
    tifffile.imwrite(tmp_path / "p.tif", page)
    stack = np.random.randint(0, 3, (5, 6, 7)).astype(np.uint8)  # 5 pages
    tifffile.imwrite(tmp_path / "s.tiff", stack)
    assert read_image([tmp_path / "p.tif"]).array.shape == (1, 6, 7, 1)
    s = read_label(tmp_path / "s.tiff")
    assert s.array.shape == (6, 7, 5) and np.array_equal(s.array[:, :, 2], stack[2])
    write_volume(tmp_path / "o.tif", s.array, s.geometry)
    assert np.array_equal(tifffile.imread(tmp_path / "o.tif"), stack)


def test_channels_are_concatenated_and_must_share_a_grid(tmp_path):
    a = nifti(tmp_path / "a_0000.nii.gz", np.zeros((4, 4, 2)))
    b = nifti(tmp_path / "a_0001.nii.gz", np.ones((4, 4, 2)))
    assert read_image([a, b]).array.shape == (2, 4, 4, 2)
    c = nifti(tmp_path / "c.nii.gz", np.ones((4, 3, 2)))
    with pytest.raises(DataError, match="c.nii.gz: has spatial shape"):
        read_image([a, c])


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_image_is_refused_naming_the_file(tmp_path, value):
    data = np.zeros((3, 3, 3))
    data[1, 1, 1] = value
    p = nifti(tmp_path / "bad.nii.gz", data)
    with pytest.raises(DataError, match=r"bad.nii.gz: contains NaN or Inf"):
        read_image([p])


@pytest.mark.parametrize(
    "data, message",
    [
        (np.full((3, 3, 3), 0.5), "non-negative integers"),
        (np.full((3, 3, 3), -1.0), "non-negative integers"),
        (np.zeros((3, 3, 3, 2)), "2 channels"),
    ],
)
def test_bad_label_maps(tmp_path, data, message):
    p = nifti(tmp_path / "lab.nii.gz", data)
    with pytest.raises(DataError, match=message):
        read_label(p)


@pytest.mark.parametrize("name, kind", [("t.nii.gz", "NIfTI"), ("t.png", "PNG"), ("t.tif", "TIFF")])
def test_truncated_files_give_one_clear_line(tmp_path, name, kind):
    p = tmp_path / name
    if kind == "NIfTI":
        nifti(p, np.random.rand(8, 8, 8))
    elif kind == "PNG":
        Image.fromarray(np.random.randint(0, 255, (32, 32), dtype=np.uint8)).save(p)
    else:
        tifffile.imwrite(p, np.random.rand(32, 32).astype(np.float32))
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(DataError) as err:
        read_image([p])
    msg = str(err.value)
    assert msg.startswith(str(p)) and f"cannot be read as {kind}" in msg and "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_image([tmp_path / "nope.png"])


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.nii.gz"

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []
    atomic_write(target, lambda tmp: tmp.write_bytes(b"whole"))
    assert target.read_bytes() == b"whole" and len(list(tmp_path.iterdir())) == 1


def test_write_checks_shape_and_format(tmp_path):
    vol = read_image([nifti(tmp_path / "i.nii.gz", np.zeros((4, 4, 2)))])
    with pytest.raises(DataError, match="does not match grid"):
        write_volume(tmp_path / "o.nii.gz", np.zeros((4, 4, 3), dtype=np.uint8), vol.geometry)
    with pytest.raises(DataError, match="PNG holds one 2D integer plane"):
        write_volume(tmp_path / "o.png", np.zeros((4, 4, 2), dtype=np.uint8), vol.geometry)
    assert not (tmp_path / "o.nii.gz").exists() and not (tmp_path / "o.png").exists()
