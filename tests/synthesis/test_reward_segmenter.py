"""The reward's ``"segmenter"`` group (issue 14): the style statistics of a frozen extractor's
maps, the source segmenter's early features from a checkpoint
(:func:`medflow.segmentation.features.early_features`): values, sizes, gradients, freezing,
the trunk's activations, and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN, make_nnunet_dataset
from torch import nn

from medflow.errors import DataError
from medflow.models.unet import NetConfig, SegNet
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.features import EarlyFeatures, early_features
from medflow.segmentation.train import train
from medflow.synthesis.config import DEFAULT_REWARD_FEATURES, AlignConfig
from medflow.synthesis.reward import FeatureEncoder, MMDReward

TINY = {**TINY_TRAIN, "val_every": 10, "checkpoint_every": 10}
SMALL = (8, 16, 32)
SIZE = TINY["size"]
CHANNELS = TINY["channels"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One-step checkpoints of a plain UNet, a MedFlowSeg network and a flow network
    without an image branch, on the tiny two-disc dataset."""
    root = tmp_path_factory.mktemp("seg")
    data = make_nnunet_dataset(root / "ds")
    runs = {
        "unet": {"model": "unet"},
        "flow": {},
        "no_branch": {"image_branch": False, "dbsa": False, "faa": False},
    }
    return {
        name: train(
            data, root / name, TrainConfig(steps=1, **TINY, **kw), quiet=True
        ).final_checkpoint
        for name, kw in runs.items()
    }


def images(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 1, SIZE, SIZE)`` z-scored-like images and a foreground mask (a disc whose
    radius differs per image, so the weights differ between images)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, SIZE, SIZE, generator=g)
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    r2 = (ys - SIZE / 2 + 0.5) ** 2 + (xs - SIZE / 2 + 0.5) ** 2
    mask = torch.stack([r2 < (4 + 2 * i) ** 2 for i in range(n)])[:, None]
    return x, mask


def style_stats(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-channel masked mean and std ``(B, 2 c)`` of a map ``(B, c, h, w)``, written out:
    the mask's share of each map pixel (the maps here are at 1 / 2**i of the image, so an
    average over ``2**i x 2**i`` blocks), the weighted mean and the population std."""
    if mask is None:
        w = torch.ones_like(h[:, :1])
    else:
        w = F.avg_pool2d(mask.float(), SIZE // h.shape[-1])
    n = w.sum((2, 3))
    mean = (h * w).sum((2, 3)) / n
    var = ((h - mean[..., None, None]) ** 2 * w).sum((2, 3)) / n
    return torch.cat([mean, (var + 1e-6).sqrt()], dim=1)


@pytest.mark.parametrize("kind", ["unet", "flow"])
def test_group_is_the_masked_channel_stats_of_the_maps(checkpoints, kind):
    ext = early_features(checkpoints[kind], levels=2)
    enc = FeatureEncoder(1, SMALL, features=("segmenter",), extractor=ext)
    assert enc.groups == tuple(2 * c for c in CHANNELS) == (16, 32)
    assert enc.feature_dim == 48
    x, mask = images()
    with torch.no_grad():
        maps = ext(x)
        assert [m.shape[1] for m in maps] == list(CHANNELS)
        for m in (mask, None):
            want = torch.cat([style_stats(h, m) for h in maps], dim=1)
            torch.testing.assert_close(enc(x, m), want, rtol=1e-5, atol=1e-6)


def test_other_groups_are_unchanged_beside_the_segmenter(checkpoints):
    ext = early_features(checkpoints["unet"], levels=1)
    both = FeatureEncoder(
        1, SMALL, seed=2, features=(*DEFAULT_REWARD_FEATURES, "segmenter"), extractor=ext
    )
    plain = FeatureEncoder(1, SMALL, seed=2)
    assert both.groups == (*plain.groups, 2 * CHANNELS[0])
    x, mask = images()
    with torch.no_grad():
        out = both(x, mask)
    assert torch.equal(out[:, : plain.feature_dim], plain(x, mask))
    # the extractor's weights are the only keys the state dict gains
    own = {k for k in both.state_dict() if not k.startswith("extractor.")}
    assert own == set(plain.state_dict()) and len(own) < len(both.state_dict())


def test_gradients_reach_the_images_and_not_the_extractor(checkpoints):
    ext = early_features(checkpoints["flow"], levels=2)
    enc = FeatureEncoder(1, SMALL, features=("segmenter",), extractor=ext)
    x, mask = images()
    x.requires_grad_(True)
    enc(x, mask).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    params = list(ext.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)
    # through the reward, as synth align would back-propagate into a generator
    refs, ref_mask = images(4, seed=1)
    reward = MMDReward(enc, refs, ref_mask=ref_mask)
    y = (x.detach() * 1.5 + 0.3).requires_grad_(True)
    loss = reward(y, mask)
    loss.backward()
    assert loss.item() > 0 and y.grad.abs().sum() > 0


def test_extractor_stays_frozen_and_in_eval_under_a_parent(checkpoints):
    ext = early_features(checkpoints["unet"], levels=2)
    parent = nn.ModuleDict(
        {"reward": FeatureEncoder(1, SMALL, features=("segmenter",), extractor=ext)}
    )
    parent.train()
    assert parent.training
    assert not any(m.training for m in ext.modules())
    ext.train()  # the extractor alone refuses too
    assert not any(m.training for m in ext.modules())

    # any module passed in is frozen and put in eval before its probe run, so the run at
    # construction updates no batch-norm statistics
    class Norms(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            return [self.norm(self.conv(x))]

    other = Norms()
    enc = FeatureEncoder(1, SMALL, features=("segmenter",), extractor=other)
    assert enc.groups == (6,)
    assert other.norm.num_batches_tracked.item() == 0
    assert not other.training and not any(p.requires_grad for p in other.parameters())


@pytest.mark.parametrize("levels", [1, 2])
def test_unet_features_are_the_trunks_activations(checkpoints, levels):
    ext = early_features(checkpoints["unet"], levels=levels)
    net = ext.net
    assert not net.cfg.flow and ext.channels == CHANNELS[:levels]
    seen = {}
    hooks = [
        net.enc[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
        for i in range(levels)
    ]
    x, _ = images(2, seed=3)
    with torch.no_grad():
        net(x)  # a real plain forward pass
        for h in hooks:
            h.remove()
        got = ext(x)
    assert len(got) == levels
    for i in range(levels):
        assert got[i].shape == (2, CHANNELS[i], SIZE // 2**i, SIZE // 2**i)
        assert torch.equal(got[i], seen[i])


@pytest.mark.parametrize("levels", [1, 2])
def test_flow_features_are_the_image_branch(checkpoints, levels):
    ext = early_features(checkpoints["flow"], levels=levels)
    assert ext.net.cfg.flow and ext.net.cfg.image_branch
    x, _ = images(2, seed=4)
    with torch.no_grad():
        got, want = ext(x), ext.net.image_features(x)[:levels]
    assert len(got) == len(want) == levels
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_errors(checkpoints):
    ext = early_features(checkpoints["unet"], levels=1)
    with pytest.raises(ValueError, match="needs an extractor"):
        FeatureEncoder(1, features=("moments", "segmenter"))
    with pytest.raises(ValueError, match="only by the feature 'segmenter'"):
        FeatureEncoder(1, extractor=ext)
    with pytest.raises(ValueError, match="does not take images"):
        FeatureEncoder(2, features=("segmenter",), extractor=ext)
    with pytest.raises(ValueError, match="list of feature maps"):
        FeatureEncoder(1, features=("segmenter",), extractor=nn.Identity())
    for bad in (0, len(CHANNELS) + 1):
        with pytest.raises(ValueError, match=f"levels must be in 1..{len(CHANNELS)}"):
            early_features(checkpoints["unet"], levels=bad)
    with pytest.raises(DataError, match="without an image branch"):
        early_features(checkpoints["no_branch"])
    with pytest.raises(ValueError, match="without an image branch"):
        EarlyFeatures(SegNet(NetConfig(1, 3, CHANNELS, image_branch=False, dbsa=False, faa=False)))
    # synth align cannot pass an extractor, so its config does not take the name
    with pytest.raises(ValueError, match="name each group once"):
        AlignConfig(reward_features=("segmenter",))
