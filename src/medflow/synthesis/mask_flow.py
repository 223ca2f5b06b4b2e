"""The mask flow: generative flow matching over label maps, the source of diversity.

A label map of K classes flows as its one-hot encoding scaled to [-1, 1]
(:func:`medflow.flows.mask_to_flow`), or optionally as per-class signed distances
(:func:`medflow.flows.encoding.mask_to_sdf`), from Gaussian noise at ``t = 0`` to a mask at
``t = 1``; the sample's label map is the argmax. The network is conditioned on a vector
``c = (present_1, ..., present_{K-1}, 1)``: which foreground classes the mask must hold, and
a flag saying that the condition is given. Training drops the condition (``c = 0``) with
probability ``class_dropout``, so the same network samples unconditionally (``classes=None``)
and class-conditioned (e.g. "masks holding a lesion of class 2").

A position-conditioned flow appends sinusoidal features of the slice's relative position
along the slice axis (0..1, :class:`SlicePositions`) to ``c``. They are never dropped: a
sample always has a position, given or drawn from the training slices' positions, so
"a slice at 40 % of the head" is one call. Sampled label maps are optionally cleaned
(:mod:`medflow.synthesis.mask_post`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medflow.flows import flow_to_mask, mask_to_flow
from medflow.flows.encoding import mask_to_sdf, sdf_to_mask
from medflow.flows.losses import velocity_matching_loss
from medflow.flows.samplers import SAMPLERS
from medflow.models.flow_unet import FlowUNet, FlowUNetConfig
from medflow.synthesis.config import MASK_ENCODINGS
from medflow.synthesis.mask_post import MaskCleanup, clean_masks

# frequencies (in half-turns over 0..1) of the position features: sin and cos of each, so a
# linear layer can resolve positions a few slices apart, which a bare scalar makes hard
POSITION_FREQUENCIES = (1, 2, 4, 8)
POSITION_DIM = 2 * len(POSITION_FREQUENCIES)


def presence(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, H, W)`` label maps -> ``(B, K - 1)`` float: 1 where a foreground class occurs."""
    present = torch.stack([(masks == c).flatten(1).any(1) for c in range(1, num_classes)], 1)
    return present.float()


def position_features(positions: torch.Tensor) -> torch.Tensor:
    """``(B,)`` relative positions in [0, 1] -> ``(B, POSITION_DIM)`` sinusoidal features."""
    freqs = torch.tensor(POSITION_FREQUENCIES, dtype=torch.float32, device=positions.device)
    angle = math.pi * positions.float()[:, None] * freqs
    return torch.cat([angle.sin(), angle.cos()], 1)


@dataclass(frozen=True)
class SlicePositions:
    """Where the training slices lie along the slice axis.

    Attributes:
        low_mm: the world coordinate (mm) that maps to relative position 0.
        high_mm: the world coordinate that maps to 1 (the training slices' range).
        train: every training slice's relative position: the distribution samples draw from.
    """

    low_mm: float
    high_mm: float
    train: tuple[float, ...]

    @classmethod
    def from_mm(cls, mm: torch.Tensor) -> SlicePositions:
        """From the ``(N,)`` world coordinates of the training slices."""
        low, high = float(mm.min()), float(mm.max())
        if not high > low:
            raise ValueError(f"slice positions need slices at two places at least, got {low}")
        rel = ((mm.double() - low) / (high - low)).tolist()
        return cls(low, high, tuple(float(r) for r in rel))

    def relative(self, mm: torch.Tensor) -> torch.Tensor:
        """World coordinates ``(B,)`` -> relative positions ``(B,)`` float32."""
        return ((mm.double() - self.low_mm) / (self.high_mm - self.low_mm)).float()

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` positions drawn uniformly from the training slices' ``(n,)``."""
        pick = torch.randint(len(self.train), (n,), generator=generator)
        return torch.tensor(self.train, dtype=torch.float32)[pick]

    def to_dict(self) -> dict:
        return {"low_mm": self.low_mm, "high_mm": self.high_mm, "train": list(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> SlicePositions:
        return cls(float(d["low_mm"]), float(d["high_mm"]), tuple(float(v) for v in d["train"]))


class MaskFlow:
    """A velocity network over ``(B, K, H, W)`` mask states, with its sampling.

    Args:
        net: a :class:`FlowUNet` with ``state_channels = K`` and ``vector_dim = K``
            (``K + POSITION_DIM`` when position-conditioned).
        encoding: the state's encoding, "onehot" or "sdf".
        sdf_width: the "sdf" encoding's width in pixels.
        positions: the training slices' positions; required exactly when the network has
            the position features.
        cleanup: clean sampled masks with these sizes; None leaves them as drawn.
    """

    def __init__(
        self,
        net: FlowUNet,
        encoding: str = "onehot",
        sdf_width: float = 4.0,
        positions: SlicePositions | None = None,
        cleanup: MaskCleanup | None = None,
    ) -> None:
        cfg = net.cfg
        extra = cfg.vector_dim - cfg.state_channels
        if extra not in (0, POSITION_DIM) or cfg.cond_channels:
            raise ValueError(f"a mask flow needs state_channels == vector_dim, got {cfg}")
        if (extra == POSITION_DIM) != (positions is not None):
            raise ValueError("a position-conditioned mask flow needs its slice positions")
        if encoding not in MASK_ENCODINGS:
            raise ValueError(f"unknown mask encoding {encoding!r}; expected {MASK_ENCODINGS}")
        self.net = net
        self.num_classes = cfg.state_channels
        self.encoding = encoding
        self.sdf_width = float(sdf_width)
        self.positions = positions
        self.cleanup = cleanup

    @classmethod
    def build(
        cls,
        num_classes: int,
        channels: tuple[int, ...],
        encoding: str = "onehot",
        sdf_width: float = 4.0,
        positions: SlicePositions | None = None,
        cleanup: MaskCleanup | None = None,
    ) -> MaskFlow:
        extra = POSITION_DIM if positions is not None else 0
        cfg = FlowUNetConfig(
            state_channels=num_classes, vector_dim=num_classes + extra, channels=channels
        )
        return cls(FlowUNet(cfg), encoding, sdf_width, positions, cleanup)

    def options(self) -> dict:
        """What the checkpoint records besides the network (:meth:`from_options`)."""
        return {
            "encoding": self.encoding,
            "sdf_width": self.sdf_width,
            "positions": None if self.positions is None else self.positions.to_dict(),
            "cleanup": None if self.cleanup is None else self.cleanup.to_dict(),
        }

    @classmethod
    def from_options(cls, net: FlowUNet, options: dict | None) -> MaskFlow:
        """The flow of ``net`` with recorded ``options``; None (a checkpoint written before
        they existed): one-hot, no positions, no clean-up."""
        o = options or {}
        pos, clean = o.get("positions"), o.get("cleanup")
        return cls(
            net,
            encoding=str(o.get("encoding", "onehot")),
            sdf_width=float(o.get("sdf_width", 4.0)),
            positions=None if pos is None else SlicePositions.from_dict(pos),
            cleanup=None if clean is None else MaskCleanup.from_dict(clean),
        )

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` label maps -> ``(B, K, H, W)`` flow states."""
        if self.encoding == "sdf":
            return mask_to_sdf(masks, self.num_classes, self.sdf_width)
        return mask_to_flow(masks, self.num_classes)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K, H, W)`` flow states -> ``(B, H, W)`` label maps."""
        return sdf_to_mask(x) if self.encoding == "sdf" else flow_to_mask(x)

    def condition(
        self, classes: torch.Tensor | None, batch: int, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The condition vector ``(B, V)`` from a ``(B, K - 1)`` presence vector (None: the
        unconditional zeros) and, for a position-conditioned flow, ``(B,)`` relative
        positions."""
        return self._with_positions(self._class_vector(classes, batch), positions)

    def _class_vector(self, classes: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The class part ``(B, K)`` of the condition."""
        device = next(self.net.parameters()).device
        if classes is None:
            return torch.zeros(batch, self.num_classes, device=device)
        if classes.shape != (batch, self.num_classes - 1):
            raise ValueError(
                f"classes must be ({batch}, {self.num_classes - 1}), got {tuple(classes.shape)}"
            )
        return torch.cat([classes.float(), torch.ones(batch, 1)], 1).to(device)

    def _with_positions(self, vec: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if self.positions is None:
            if positions is not None:
                raise ValueError("this mask flow was trained without slice positions")
            return vec
        if positions is None or positions.shape != (vec.shape[0],):
            got = None if positions is None else tuple(positions.shape)
            raise ValueError(f"positions must be ({vec.shape[0]},), got {got}")
        return torch.cat([vec, position_features(positions.to(vec.device))], 1)

    def loss(
        self,
        masks: torch.Tensor,
        generator: torch.Generator,
        class_dropout: float,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow-matching loss on a batch of ``(B, H, W)`` label maps (at ``(B,)`` relative
        positions for a position-conditioned flow)."""
        b = masks.shape[0]
        vec = self._class_vector(presence(masks.cpu(), self.num_classes), b)
        keep = (torch.rand(b, generator=generator) >= class_dropout).float().to(vec.device)
        # only the class condition is dropped; a position is always known
        vec = self._with_positions(vec * keep[:, None], positions)
        x1 = self.encode(masks)
        return velocity_matching_loss(lambda x, t: self.net(x, t, None, vec), x1, generator)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        size: tuple[int, int],
        generator: torch.Generator,
        steps: int = 20,
        sampler: str = "euler",
        classes: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``n`` label maps ``(n, H, W)`` (uint8) from noise drawn with ``generator``.

        A position-conditioned flow draws ``(n,)`` relative positions from the training
        slices' after the noise, unless ``positions`` are given. With a clean-up, the maps
        are cleaned (:func:`~medflow.synthesis.mask_post.clean_masks`).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        device = next(self.net.parameters()).device
        x0 = torch.randn((n, self.num_classes, *size), generator=generator).to(device)
        if self.positions is not None and positions is None:
            positions = self.positions.draw(n, generator)
        vec = self.condition(classes, n, positions)
        x1 = SAMPLERS[sampler](lambda x, t, c: self.net(x, t, None, c), x0, vec, steps)
        masks = self.decode(x1).to(torch.uint8).cpu()
        if self.cleanup is not None:
            masks = clean_masks(masks, self.num_classes, self.cleanup)
        return masks
