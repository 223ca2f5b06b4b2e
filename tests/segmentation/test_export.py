"""ONNX export of the one-call predictors, run under onnxruntime against PyTorch."""

import json

import pytest
import torch
from conftest import TINY_TRAIN

from medflow.cli import main
from medflow.errors import MedflowError, OutputExistsError
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.export import TOLERANCE, export_onnx
from medflow.segmentation.inference import flow_probs, unet_probs
from medflow.segmentation.predict import Predictor
from medflow.segmentation.train import train

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TINY = {**TINY_TRAIN, "val_every": 10, "checkpoint_every": 10}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A MedFlowSeg checkpoint exported through the CLI and a UNet one through the function."""
    from conftest import make_nnunet_dataset

    root = tmp_path_factory.mktemp("export")
    data = make_nnunet_dataset(root / "ds")
    out = {}
    for model in ("medflowseg", "unet"):
        ckpt = train(data, root / model, TrainConfig(model=model, steps=1, **TINY), quiet=True)
        out[model] = (ckpt.final_checkpoint, root / f"{model}.onnx")
    assert (
        main(["export", "--model", str(out["medflowseg"][0]), "--out", str(root / "m.onnx")]) == 0
    )
    out["medflowseg"] = (out["medflowseg"][0], root / "m.onnx")
    result = export_onnx(*out["unet"])
    assert result.inputs == ("image",) and result.max_abs_diff <= TOLERANCE
    return out


def run(path, **inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs)
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])


def test_flow_export_matches_medflow_predict_one_step(exported):
    ckpt, path = exported["medflowseg"]
    net = Predictor(ckpt, device="cpu").net
    images = torch.randn(5, 1, 16, 16)  # a batch size other than the traced one
    want = flow_probs(net, images, seed=7)  # one Euler step, noise from seed 7
    noise = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    got = run(path, image=images, noise=noise)
    assert got.shape == want.shape == (5, 3, 16, 16)
    assert (got - want).abs().max() <= TOLERANCE
    # the noise is an input: other noise, other output
    assert (run(path, image=images, noise=-noise) - want).abs().max() > 10 * TOLERANCE


def test_unet_export_matches_pytorch_and_carries_its_metadata(exported):
    ckpt, path = exported["unet"]
    predictor = Predictor(ckpt, device="cpu")
    images = torch.randn(3, 1, 16, 16)
    got = run(path, image=images)
    assert (got - unet_probs(predictor.net, images)).abs().max() <= TOLERANCE
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["medflow_labels"]) == {"background": 0, "a": 1, "b": 2}
    assert json.loads(meta["medflow_preprocessing"])["size"] == [16, 16]


def test_export_refuses_to_overwrite_and_refuses_diffusion(exported, tmp_path, capsys):
    ckpt, path = exported["unet"]
    with pytest.raises(OutputExistsError):
        export_onnx(ckpt, path)
    from medflow.segmentation.config import TrainConfig as Config
    from medflow.segmentation.methods import Diffusion

    diffusion = Predictor(ckpt, device="cpu")
    diffusion.method = Diffusion(Config(model="diffusion"))
    from medflow.segmentation.export import predictor_module

    with pytest.raises(MedflowError, match="diffusion model predicts in 10 to 1000"):
        predictor_module(diffusion)
    assert main(["export", "--model", str(ckpt), "--out", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_the_check_reports_a_mismatch(exported):
    from medflow.segmentation.export import check_onnx
    from medflow.segmentation.methods import UNetProbs

    class Wrong(torch.nn.Module):
        def forward(self, image):
            return torch.full((image.shape[0], 3, *image.shape[-2:]), 1 / 3)

    ckpt, path = exported["unet"]
    images = (torch.randn(2, 1, 16, 16),)
    with pytest.raises(RuntimeError, match="differ from PyTorch's"):
        check_onnx(path, Wrong(), images, ("image",))
    right = UNetProbs(Predictor(ckpt, device="cpu").net)
    assert check_onnx(path, right, images, ("image",)) <= TOLERANCE
