import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_TRAIN, make_nnunet_dataset
from PIL import Image

from medflow.errors import DataError, OutputExistsError
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.predict import Predictor, SamplingOptions, predict_folder
from medflow.segmentation.train import train

TINY = {**TINY_TRAIN, "val_every": 10, "checkpoint_every": 10}


@pytest.fixture(scope="module")
def nifti_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    data = make_nnunet_dataset(root / "ds", spacing=(0.9, 1.1, 3.0))
    result = train(data, root / "run", TrainConfig(steps=2, **TINY), quiet=True)
    return data, result.final_checkpoint


def test_nifti_volume_comes_back_with_its_shape_affine_and_header(nifti_run, tmp_path):
    data, ckpt = nifti_run
    written = predict_folder(ckpt, data / "imagesTs", tmp_path / "p", quiet=True)
    assert [p.name for p in written] == ["case04.nii.gz", "case05.nii.gz"]
    for p in written:
        src = nib.load(str(data / "imagesTs" / p.name.replace(".nii.gz", "_0000.nii.gz")))
        out = nib.load(str(p))
        assert out.shape == src.shape
        assert np.allclose(out.affine, src.affine)
        assert np.allclose(out.header.get_zooms(), src.header.get_zooms())
        assert out.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 2}


def test_predictions_are_reproducible_and_every_sampler_keeps_the_grid(nifti_run):
    data, ckpt = nifti_run
    predictor = Predictor(ckpt, device="cpu")
    from medflow.data.io import read_image

    vol = read_image([data / "imagesTs" / "case04_0000.nii.gz"])
    one = predictor.predict_volume(vol)
    assert np.array_equal(one, predictor.predict_volume(vol))
    several = predictor.predict_volume(vol, SamplingOptions(steps=3, sampler="heun", samples=2))
    assert several.shape == one.shape == vol.geometry.shape


def test_refuses_to_overwrite_and_checks_channels(nifti_run, tmp_path):
    data, ckpt = nifti_run
    predict_folder(ckpt, data / "imagesTs", tmp_path / "p", quiet=True)
    with pytest.raises(OutputExistsError):
        predict_folder(ckpt, data / "imagesTs", tmp_path / "p", quiet=True)
    predict_folder(ckpt, data / "imagesTs", tmp_path / "p", quiet=True, force=True)
    two = np.random.rand(6, 6, 2, 2).astype(np.float32)  # a 2-channel 4D image
    nib.save(nib.Nifti1Image(two, np.eye(4)), str(tmp_path / "two.nii.gz"))
    with pytest.raises(DataError, match=r"two.nii.gz: has 2 channel\(s\) but the model was"):
        predict_folder(ckpt, tmp_path / "two.nii.gz", tmp_path / "q", quiet=True)
    assert not (tmp_path / "q").exists()


def test_png_in_png_out(tmp_path):
    data = make_nnunet_dataset(tmp_path / "ds", shape=(24, 20, 1), ending=".png", n_train=3)
    result = train(data, tmp_path / "run", TrainConfig(steps=1, **TINY), quiet=True)
    written = predict_folder(result.final_checkpoint, data / "imagesTs", tmp_path / "p", quiet=True)
    assert all(p.suffix == ".png" for p in written)
    assert np.asarray(Image.open(written[0])).shape == (24, 20)


def test_multichannel_dataset_trains_and_predicts(tmp_path):
    data = make_nnunet_dataset(tmp_path / "ds", channels=2, n_train=2, n_test=1)
    result = train(data, tmp_path / "run", TrainConfig(steps=1, **TINY), quiet=True)
    predictor = Predictor(result.final_checkpoint, device="cpu")
    assert predictor.net_cfg.in_channels == 2
    written = predict_folder(result.final_checkpoint, data / "imagesTs", tmp_path / "p", quiet=True)
    assert [p.name for p in written] == ["case02.nii.gz"]
