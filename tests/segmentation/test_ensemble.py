import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_TRAIN, make_nnunet_dataset

from medflow.cli import main
from medflow.data.io import read_image
from medflow.errors import DataError, OptionError
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.ensemble import Ensemble
from medflow.segmentation.predict import Predictor, predict_folder
from medflow.segmentation.train import train

TINY = {**TINY_TRAIN, "val_every": 10, "checkpoint_every": 10}


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """A flow at 16 x 16 and a UNet at 24 x 24 (other preprocessing, other method) on one
    3D dataset, and a flow on a two-channel dataset."""
    root = tmp_path_factory.mktemp("ens")
    data = make_nnunet_dataset(root / "ds")
    flow = train(data, root / "flow", TrainConfig(steps=3, **TINY), quiet=True)
    unet_cfg = TrainConfig(steps=3, **{**TINY, "size": 24, "model": "unet", "seg_weight": 1.0})
    unet = train(data, root / "unet", unet_cfg, quiet=True)
    other = make_nnunet_dataset(root / "other", channels=2, n_train=2, n_test=1)
    odd = train(other, root / "odd", TrainConfig(steps=1, **TINY), quiet=True)
    return data, flow.final_checkpoint, unet.final_checkpoint, odd.final_checkpoint


def test_the_ensemble_averages_its_members_soft_masks_on_the_native_grid(members):
    data, flow, unet, _ = members
    image = read_image([data / "imagesTs" / "case04_0000.nii.gz"])
    a = Predictor(flow, "cpu", postprocess=False)
    b = Predictor(unet, "cpu", postprocess=False)
    pa, pb = a.native_probs(image), b.native_probs(image)
    assert pa.shape == pb.shape == (*image.geometry.shape, 3)
    assert np.allclose(pa.sum(-1), 1.0, atol=1e-5)
    # each member's soft mask is what its own labels are decoded from
    assert np.array_equal(pa.argmax(-1), a.predict_volume(image))
    assert np.array_equal(pb.argmax(-1), b.predict_volume(image))
    ens = Ensemble([flow, unet], "cpu", postprocess=False)
    assert np.allclose(ens.native_probs(image), (pa + pb) / 2, atol=1e-6)
    labels = ens.predict_volume(image)
    assert np.array_equal(labels, ((pa + pb) / 2).argmax(-1))
    # an ensemble of different models is not either member
    assert not np.array_equal(pa.argmax(-1), pb.argmax(-1))


def test_an_ensemble_of_one_model_twice_is_that_model(members):
    data, flow, _, _ = members
    image = read_image([data / "imagesTs" / "case05_0000.nii.gz"])
    alone = Predictor(flow, "cpu").predict_volume(image)
    assert np.array_equal(Ensemble([flow, flow], "cpu").predict_volume(image), alone)


def test_members_must_read_the_same_channels(members, tmp_path, capsys):
    data, flow, _, odd = members
    with pytest.raises(DataError, match=r"odd.*reads channels .*the same input"):
        Ensemble([flow, odd], "cpu")
    argv = ["predict", "--model", str(flow), str(odd), "--input", str(data / "imagesTs"),
            "--out", str(tmp_path / "p"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{odd}: reads channels" in err and str(flow) in err
    assert not (tmp_path / "p").exists()


def test_predict_folder_with_several_checkpoints_writes_the_ensemble_masks(members, tmp_path):
    data, flow, unet, _ = members
    assert main(
        ["predict", "--model", str(flow), str(unet), "--input", str(data / "imagesTs"),
         "--out", str(tmp_path / "p"), "--quiet"]
    ) == 0  # fmt: skip
    ens = Ensemble([flow, unet], "cpu")
    for case in ("case04", "case05"):
        written = nib.load(str(tmp_path / "p" / f"{case}.nii.gz"))
        image = read_image([data / "imagesTs" / f"{case}_0000.nii.gz"])
        assert np.array_equal(np.asarray(written.dataobj), ens.predict_volume(image))
        assert np.allclose(written.affine, image.geometry.affine)


@pytest.mark.parametrize("extra", [["--uncertainty"], ["--save-samples"], ["--fusion", "vote"]])
def test_an_ensemble_refuses_per_model_outputs_before_writing(members, tmp_path, capsys, extra):
    data, flow, unet, _ = members
    out = tmp_path / "p"
    argv = ["predict", "--model", str(flow), str(unet), "--input", str(data / "imagesTs"),
            "--out", str(out), "--quiet", *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and extra[0] in err and "ensemble" in err
    assert not out.exists()
    with pytest.raises(OptionError):
        predict_folder([flow, unet], data / "imagesTs", out, uncertainty=True, quiet=True)
