"""ONNX export of a checkpoint's one-evaluation predictor, checked against PyTorch.

A MedFlowSeg checkpoint exports as ``(image (B, C, H, W), noise (B, K, H, W)) -> probs
(B, K, H, W)``: one Euler step from ``t = 0`` followed by the probability map, exactly what
``medflow predict`` computes per slice with its default options (the noise is an input, so
ensembles and seeds stay with the caller). A UNet checkpoint exports as
``image -> probs``. ``H, W`` are the training size (``preprocessing.size``, stored in the
model's metadata with the labels and the rest of the preprocessing); the batch is dynamic.
A diffusion checkpoint is refused: its predictor is a 10- to 1000-step sampler, not one call.

The exporter is torch's dynamo-based one (``onnxscript``): the TorchScript exporter has no
ONNX mapping for the FFTs of Frequency-Aware Attention.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medflow.data.io import atomic_write
from medflow.errors import MedflowError, OutputExistsError
from medflow.segmentation.predict import Predictor

# float32 ONNX Runtime against float32 PyTorch on the same CPU: differences come from the
# kernels' summation order only (measured 3e-7 on probabilities of the test models)
TOLERANCE = 1e-4
OPSET = 18


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        inputs: names of its inputs, in order.
        max_abs_diff: largest difference between ONNX Runtime's and PyTorch's probabilities
            on a random batch; None when onnxruntime is not installed (not checked).
    """

    path: Path
    inputs: tuple[str, ...]
    max_abs_diff: float | None


def predictor_module(predictor: Predictor) -> tuple[nn.Module, tuple[str, ...]]:
    """The module to export for a loaded checkpoint (its method's, on the CPU in float32)
    and the names of its inputs.

    Raises:
        MedflowError: a method with no one-call predictor (diffusion)."""
    try:
        return predictor.method.export_module(predictor.net.cpu().float().eval())
    except MedflowError as exc:
        raise MedflowError(f"{predictor.path}: {exc}") from None


def example_inputs(
    predictor: Predictor, names: tuple[str, ...], batch: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random inputs for the exported module's ``names``: ``batch`` slices of the training
    size (``"image"``) and, for a flow, their noise (``"noise"``)."""
    gen = torch.Generator().manual_seed(seed)
    cfg, (h, w) = predictor.net_cfg, predictor.prep.size
    channels = {"image": cfg.in_channels, "noise": cfg.num_classes}
    return tuple(torch.randn(batch, channels[n], h, w, generator=gen) for n in names)


def export_onnx(checkpoint: str | Path, out: str | Path, *, force: bool = False) -> ExportResult:
    """Export the checkpoint's predictor to ``out`` and, when onnxruntime is installed, check
    that it gives PyTorch's probabilities within :data:`TOLERANCE` on a random batch of a
    size other than the one traced (the batch axis is dynamic).

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is False.
        MedflowError: a diffusion checkpoint, or the exporter's packages are missing.
        RuntimeError: ONNX Runtime disagrees with PyTorch (nothing is written).
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(out)
    # the exported graph gets ONNX Runtime's own layouts; trace the plain contiguous network
    predictor = Predictor(checkpoint, device="cpu", channels_last=False)
    module, names = predictor_module(predictor)
    batch = {0: torch.export.Dim("batch", min=1)}
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                example_inputs(predictor, names, 2),
                dynamo=True,
                opset_version=OPSET,
                input_names=list(names),
                output_names=["probs"],
                dynamic_shapes={n: batch for n in names},
                verbose=False,
            )
    except ModuleNotFoundError as exc:
        raise MedflowError(
            f"ONNX export needs the packages onnx and onnxscript ({exc.name} is missing): "
            "pip install onnx onnxscript"
        ) from exc
    program.model.metadata_props.update(
        {
            "medflow_labels": json.dumps(predictor.labels),
            "medflow_channel_names": json.dumps(predictor.channel_names),
            "medflow_preprocessing": json.dumps(predictor.prep.to_dict()),
            "medflow_method": predictor.method.name,
            "medflow_parameterization": predictor.method.cfg.parameterization,
        }
    )
    diff: list[float | None] = [None]

    def write(tmp: Path) -> None:
        program.save(str(tmp))
        diff[0] = check_onnx(tmp, module, example_inputs(predictor, names, 3, seed=1), names)

    atomic_write(out, write)
    return ExportResult(out, names, diff[0])


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes on packages it can do without (torchvision) and its
    deprecation warnings: they concern torch's internals, not the user's model."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def check_onnx(
    path: Path, module: nn.Module, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...]
) -> float | None:
    """Largest absolute difference between ONNX Runtime and ``module`` on ``inputs``; None
    without onnxruntime. Raises RuntimeError above :data:`TOLERANCE`."""
    try:
        import onnxruntime
    except ModuleNotFoundError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
    with torch.no_grad():
        want = module(*inputs)
    diff = float((torch.from_numpy(got) - want).abs().max())
    if not diff <= TOLERANCE:
        raise RuntimeError(
            f"ONNX Runtime's probabilities differ from PyTorch's by {diff:.2e} "
            f"(> {TOLERANCE:.0e}); the export is wrong, nothing written"
        )
    return diff
