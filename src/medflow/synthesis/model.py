"""A synthesis checkpoint: the mask flow, the image flow, and what is needed to write their
samples as a dataset that ``medflow train`` reads like the source.

Written after stage 1 (``synth train``) and again after stage 2 (``synth align``, with the
fine-tuned image flow and an ``alignment`` record). Read with ``weights_only`` like every
medflow checkpoint. The mask flow's options (encoding, slice positions, clean-up) are the
optional ``mask_flow`` record; a checkpoint written before it existed reads as a one-hot
flow without positions or clean-up, as it was trained. An alignment that keeps the head's
outline (``AlignConfig.keep_outline``) also stores stage 1's image network as the optional
``outline_net``; without it the aligned flow samples alone, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from medflow import __version__
from medflow.data.transforms import Preprocessing
from medflow.engine.checkpoint import load_checkpoint, save_checkpoint
from medflow.engine.runtime import configure_threads, resolve_device
from medflow.errors import DataError, MedflowError, OutputExistsError
from medflow.models.flow_unet import FlowUNet, FlowUNetConfig
from medflow.synthesis.image_flow import ImageFlow
from medflow.synthesis.mask_flow import MaskFlow

FORMAT = "medflow-synth-v1"
REQUIRED = (
    "format",
    "config",
    "mask_net",
    "image_net",
    "preprocessing",
    "labels",
    "channel_names",
    "file_ending",
    "background_level",
    "sample_steps",
)


def start_run(
    out: Path, files: tuple[str, ...], *, force: bool, device: str, threads: int | None, seed: int
) -> tuple[torch.device, torch.Generator]:
    """What a synthesis run (``synth train``, ``synth align``) does first: refuse a run folder
    that is a file, or that holds any of ``files`` without ``force``; then set the threads
    and torch's seed. Returns the resolved device and a CPU generator seeded with ``seed``."""
    if out.exists() and not out.is_dir():
        raise MedflowError(f"{out}: is a file; expected a run folder")
    if any((out / name).exists() for name in files) and not force:
        raise OutputExistsError(out)
    dev = resolve_device(device)
    configure_threads(threads)
    torch.manual_seed(seed)
    return dev, torch.Generator().manual_seed(seed)


@dataclass
class SynthModel:
    """Both flows and the source data's conventions.

    Attributes:
        mask_flow: the generative mask flow.
        image_flow: the mask-conditioned image flow (fine-tuned after ``align``).
        prep: the source's preprocessing (normalisation, slice axis, size).
        labels: ``dataset.json`` labels of the source, name -> value.
        channel_names: ``dataset.json`` channel names of the source.
        file_ending: the source's file ending; samples are written in the same format.
        background_level: normalised intensity of the source's zero background, or None
            when the source has no zero background (see :mod:`medflow.synthesis.sample`).
        sample_steps: Euler steps ``sample`` uses by default (after alignment: the steps the
            reward was optimised through).
        config: the stage-1 config as a dict.
        alignment: None before stage 2; afterwards what it did (config, references, reward).
        outline_flow: stage 1's image flow, kept by an alignment with ``keep_outline``: its
            image for the same mask and noise says which pixels stay background
            (:func:`medflow.synthesis.view.keep_outline`); None otherwise.
    """

    mask_flow: MaskFlow
    image_flow: ImageFlow
    prep: Preprocessing
    labels: dict[str, int]
    channel_names: list[str]
    file_ending: str
    background_level: float | None
    sample_steps: int
    config: dict
    alignment: dict | None = field(default=None)
    outline_flow: ImageFlow | None = field(default=None)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.prep.size)

    def to(self, device: torch.device) -> SynthModel:
        self.mask_flow.net.to(device)
        self.image_flow.net.to(device)
        if self.outline_flow is not None:
            self.outline_flow.net.to(device)
        return self

    def save(self, path: str | Path) -> Path:
        def net(module: FlowUNet) -> dict:
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            return {"config": module.cfg.to_dict(), "state": state}

        payload = {
            "format": FORMAT,
            "version": __version__,
            "config": self.config,
            "mask_net": net(self.mask_flow.net),
            "image_net": net(self.image_flow.net),
            "preprocessing": self.prep.to_dict(),
            "labels": dict(self.labels),
            "channel_names": list(self.channel_names),
            "file_ending": self.file_ending,
            "background_level": self.background_level,
            "sample_steps": self.sample_steps,
            "alignment": self.alignment,
            "mask_flow": self.mask_flow.options(),
            "outline_net": None if self.outline_flow is None else net(self.outline_flow.net),
        }
        return save_checkpoint(path, payload, REQUIRED)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | None = None) -> SynthModel:
        """Read a synthesis checkpoint.

        Raises:
            DataError: not a synthesis checkpoint, or its networks do not fit their configs.
        """
        ckpt = load_checkpoint(path, FORMAT, REQUIRED)
        try:
            nets = [_net(ckpt[key]) for key in ("mask_net", "image_net")]
            outline = ckpt.get("outline_net")
            model = cls(
                mask_flow=MaskFlow.from_options(nets[0], ckpt.get("mask_flow")),
                image_flow=ImageFlow(nets[1]),
                prep=Preprocessing.from_dict(ckpt["preprocessing"]),
                labels={str(k): int(v) for k, v in ckpt["labels"].items()},
                channel_names=[str(c) for c in ckpt["channel_names"]],
                file_ending=str(ckpt["file_ending"]),
                background_level=ckpt["background_level"],
                sample_steps=int(ckpt["sample_steps"]),
                config=dict(ckpt["config"]),
                alignment=ckpt.get("alignment"),
                outline_flow=None if outline is None else ImageFlow(_net(outline)),
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise DataError(
                path, f"synthesis checkpoint is damaged or inconsistent: {str(exc)[:120]}"
            ) from exc
        return model.to(device) if device is not None else model


def _net(entry: dict) -> FlowUNet:
    """A stored network (``{"config": ..., "state": ...}``), in eval mode."""
    net = FlowUNet(FlowUNetConfig.from_dict(entry["config"]))
    net.load_state_dict(entry["state"])
    return net.eval()
