"""The random feature encoder and the MMD reward: determinism, frozen weights, gradients, a
toy alignment that recovers an intensity map, and sensitivity to each simulated site shift."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medflow.metrics.distribution import mmd2
from medflow.synthesis.reward import FeatureEncoder, MMDReward, feature_scale

SMALL = (8, 16, 32)  # encoder widths for the tests that run many steps


def phantoms(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``(n, 1, size, size)`` raw images in [0, ~1]: background 0, an elliptic head at 0.5 with
    three discs at 1.0 inside (two tissue classes), and a little noise inside the head."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=g)

    out = []
    for _ in range(n):
        cx, cy, ax, ay = (
            uniform(-0.1, 0.1),
            uniform(-0.1, 0.1),
            uniform(0.6, 0.8),
            uniform(0.7, 0.9),
        )
        head = (((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2 < 1).float()
        img = 0.5 * head
        for _ in range(3):
            bx, by, r = uniform(-0.4, 0.4), uniform(-0.4, 0.4), uniform(0.12, 0.25)
            disc = ((xs - cx - bx) ** 2 + (ys - cy - by) ** 2 < r**2).float() * head
            img = torch.where(disc > 0, torch.ones_like(img), img)
        img = img + 0.03 * torch.randn(img.shape, generator=g) * head
        out.append(img.clamp_min(0.0))
    return torch.stack(out)[:, None]


def zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = math.ceil(3 * sigma)
    t = torch.arange(-k, k + 1, dtype=x.dtype)
    w = torch.exp(-(t**2) / (2 * sigma**2))
    w = w / w.sum()
    x = F.conv2d(F.pad(x, (k, k, 0, 0), mode="replicate"), w.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, k, k), mode="replicate"), w.view(1, 1, -1, 1))


def bias_field(x: torch.Tensor, strength: float, seed: int = 1) -> torch.Tensor:
    """Multiply by ``exp(strength * ramp)``, a linear ramp in a random direction per image."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    angle = 2 * math.pi * torch.rand(n, generator=g)
    ramp = torch.cos(angle)[:, None, None] * xs + torch.sin(angle)[:, None, None] * ys
    return x * torch.exp(strength * ramp)[:, None]


def test_same_seed_same_features_other_seed_different():
    x = zscore(phantoms(3, 24))
    a = FeatureEncoder(1, SMALL, seed=3)(x)
    b = FeatureEncoder(1, SMALL, seed=3)(x)
    c = FeatureEncoder(1, SMALL, seed=4)(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


def test_frozen_and_stays_in_eval_mode():
    enc = FeatureEncoder(2)
    assert not any(p.requires_grad for p in enc.parameters())
    assert len(list(enc.parameters())) == 6  # weight and bias of three convs
    parent = torch.nn.Sequential(enc).train()
    assert not enc.training and not parent[0].training


@pytest.mark.parametrize(("channels", "h", "w"), [(1, 32, 32), (1, 17, 23), (2, 3, 5), (1, 1, 1)])
def test_output_dim_for_any_size(channels, h, w):
    enc = FeatureEncoder(channels)
    feats = enc(torch.randn(2, channels, h, w))
    assert feats.shape == (2, enc.feature_dim)
    assert enc.feature_dim == 4 * channels + 16 * channels + 2 * (32 + 64 + 128)
    assert torch.isfinite(feats).all()


def test_gradient_reaches_the_input():
    x = zscore(phantoms(2, 16)).requires_grad_(True)
    FeatureEncoder(1, SMALL)(x).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_encoder_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        FeatureEncoder(1)(torch.zeros(2, 3, 8, 8))


def test_feature_scale_equal_group_weight_and_floor():
    torch.manual_seed(0)
    # group 1: two features of spreads 1 and 3; group 2: four features of spread 100
    feats = torch.cat([torch.randn(50, 1), 3 * torch.randn(50, 1), 100 * torch.randn(50, 4)], 1)
    scale = feature_scale(feats, (2, 4))
    # each group's total variance after scaling is ~1 (a little less: the floor), whatever its
    # units and its size
    total = (feats / scale).var(0)
    assert total[:2].sum().item() == pytest.approx(total[2:].sum().item(), rel=0.05)
    assert 0.9 < total[2:].sum().item() <= 1.0
    # a feature constant over the pool is divided by the floor, 0.1 x its group's rms std
    # (times sqrt of the group size), not by its own zero spread
    feats[:, 0] = 7.0
    scale = feature_scale(feats, (2, 4))
    rms = feats[:, :2].var(0).mean().sqrt().item()
    assert scale[0].item() == pytest.approx(0.1 * rms * math.sqrt(2), rel=1e-5)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_scale(feats[:1], (2, 4))


def test_reward_zero_on_the_references_and_one_reference_needs_a_scale():
    enc = FeatureEncoder(1, SMALL)
    refs = zscore(phantoms(4, 32, seed=2))
    assert abs(MMDReward(enc, refs)(refs).item()) < 1e-4
    with pytest.raises(ValueError, match="scale_from"):
        MMDReward(enc, refs[:1])
    reward = MMDReward(enc, refs[:1], scale_from=zscore(phantoms(4, 32, seed=3)))
    x = zscore(phantoms(3, 32, seed=4)).requires_grad_(True)
    loss = reward(x)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_alignment_recovers_an_intensity_map():
    # target site: 2 s^2 - 1 of other subjects; the generator: a s^g + b of the source
    # subjects, from the identity. The features must pull (a, g, b) to (2, 2, -1).
    source = phantoms(8, 32, seed=1) + 0.1  # > 0, so s^g has a finite gradient in g
    refs = 2.0 * (phantoms(8, 32, seed=2) + 0.1) ** 2 - 1.0
    reward = MMDReward(FeatureEncoder(1, SMALL), refs, scale_from=source)
    log_g, a, b = (torch.tensor(v, requires_grad=True) for v in (0.0, 1.0, 0.0))
    opt = torch.optim.Adam([log_g, a, b], lr=0.05)
    start = reward(source).item()
    for _ in range(80):
        loss = reward(a * source ** log_g.exp() + b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = reward(a * source ** log_g.exp() + b).item()
        # the floor: the true map still leaves the MMD between two different sets of subjects
        floor = reward(2.0 * source**2 - 1.0).item()
    assert end < 0.25 * start
    assert end < 1.2 * floor
    assert log_g.exp().item() == pytest.approx(2.0, abs=0.2)
    assert a.item() == pytest.approx(2.0, abs=0.2) and b.item() == pytest.approx(-1.0, abs=0.2)


def test_reward_sees_every_site_shift():
    # a second clean batch of other subjects sets the yardstick: every shifted version of it
    # must lie clearly farther from the clean references
    refs = zscore(phantoms(8, 32, seed=2))
    reward = MMDReward(FeatureEncoder(1), refs, scale_from=zscore(phantoms(8, 32, seed=1)))
    clean = phantoms(8, 32, seed=3)
    noise = 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))
    base = reward(zscore(clean)).item()
    shifted = {
        "gamma": zscore(clean**1.5),
        "noise": zscore(clean + noise),
        "blur": zscore(blur(clean, 1.0)),
        "bias": zscore(bias_field(clean, 0.6)),
    }
    # measured ratios on this data: gamma 4.1, noise 3.2, blur 3.0, bias 1.65 (the weakest)
    need = {"gamma": 2.0, "noise": 2.0, "blur": 2.0, "bias": 1.25}
    ratios = {k: reward(v).item() / base for k, v in shifted.items()}
    assert all(ratios[k] > need[k] for k in need), ratios


def shrink(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The head scaled about the frame centre by ``factor`` (a peripheral slice: a small head)."""
    theta = torch.tensor([[1 / factor, 0.0, 0.0], [0.0, 1 / factor, 0.0]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def _initial_pull(reward, images, mask) -> float:
    x = images.clone().requires_grad_(True)
    reward(x, mask).backward()
    return x.grad.norm().item()


def test_reward_strength_does_not_fall_with_k():
    # references as the first K of a set ordered like the shifted site's: the middle slice
    # first, then ever smaller and larger heads from all over the brain; a contrast change
    enc = FeatureEncoder(1, SMALL)
    factors = [1.0, 0.45, 0.95, 0.5, 0.9, 0.55, 0.85, 0.6, 0.8, 0.65]
    heads = phantoms(10, 32, seed=2)
    raw_refs = torch.cat([shrink(heads[i : i + 1], f) for i, f in enumerate(factors)]) ** 0.5
    raw_gen = phantoms(8, 32, seed=1)
    refs, ref_fg, gen, gen_fg = zscore(raw_refs), raw_refs > 0.05, zscore(raw_gen), raw_gen > 0.05
    ks = (1, 2, 5, 10)
    pulls = [
        _initial_pull(
            MMDReward(enc, refs[:k], ref_mask=ref_fg[:k], scale_from=gen, scale_mask=gen_fg),
            gen,
            gen_fg,
        )
        for k in ks
    ]
    # the gradient on the generated images is what the regulariser is weighed against
    assert max(pulls) < 1.2 * min(pulls), pulls

    # the yardstick it replaces, scale and kernel widths from the references pooled with the
    # generated images, pushes K = 10 clearly less hard than K = 1 on the same data
    def pooled(k):
        with torch.no_grad():
            ref, own = enc(refs[:k], ref_fg[:k]), enc(gen, gen_fg)
            scale = feature_scale(torch.cat([ref, own]), enc.groups)
        return lambda x, m: mmd2(enc(x, m) / scale, ref / scale)

    old = [_initial_pull(pooled(k), gen, gen_fg) for k in ks]
    assert old[0] > 1.3 * old[-1], old
