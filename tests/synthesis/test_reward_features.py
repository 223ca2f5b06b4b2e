"""The reward encoder's selectable feature groups: the default is the original encoder bit
for bit; each new group sees the shift it is for and not what it should not see; gradients;
the ``reward_features`` option in the config, the CLI and ``synth align``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_nnunet_dataset
from test_reward import bias_field, blur

from medflow.cli import _config_from_args, build_parser, main
from medflow.metrics.distribution import MEDIAN_MULTIPLES, median_distance, mmd2
from medflow.synthesis.align import align
from medflow.synthesis.config import DEFAULT_REWARD_FEATURES, REWARD_FEATURES, AlignConfig
from medflow.synthesis.reward import FeatureEncoder, MMDReward, feature_scale

SMALL = (8, 16, 32)
NEW = ("fine_histogram", "laplacian", "lowfreq")


def heads(n: int, size: int = 40, seed: int = 0, noise: float = 0.02) -> torch.Tensor:
    """``(n, 1, size, size)`` positive raw images: an elliptic head (background 0) whose
    tissue has three intensities (0.3, 0.6, 0.9) laid out by a random smooth pattern, so
    every image has the same tissue classes in a different place."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    head = ((xs / 0.75) ** 2 + (ys / 0.8) ** 2 < 1).float()
    out = []
    for _ in range(n):
        phase, freq = 2 * math.pi * torch.rand(3, generator=g), 3 + 2 * torch.rand(2, generator=g)
        pattern = torch.sin(freq[0] * xs + phase[0]) * torch.cos(freq[1] * ys + phase[1])
        pattern = pattern + 0.5 * torch.sin(4 * (xs + ys) + phase[2])
        levels = torch.tensor([0.3, 0.6, 0.9])[torch.bucketize(pattern, torch.tensor([-0.4, 0.4]))]
        out.append((levels + noise * torch.randn(size, size, generator=g)) * head)
    return torch.stack(out)[:, None]


def tissue_zscore(x: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Each image z-scored over its tissue ``fg``, background at its normalised zero (as
    ``medflow train`` reads a skull-stripped scan)."""
    w = fg.float()
    n = w.sum((2, 3), keepdim=True)
    mean = (x * w).sum((2, 3), keepdim=True) / n
    std = (((x - mean) ** 2 * w).sum((2, 3), keepdim=True) / n).sqrt()
    return (x - mean) / std


def original_features(enc: FeatureEncoder, x: torch.Tensor, mask) -> torch.Tensor:
    """The encoder's features as computed before the groups could be chosen (moments, the
    16-bin soft histogram, the conv levels' mean and std, all over the mask), step by step."""
    b = x.shape[0]

    def weights(like):
        if mask is None:
            return torch.ones_like(like[:, :1]).flatten(2)
        w = F.adaptive_avg_pool2d(mask.to(like.dtype), like.shape[-2:]).flatten(2)
        return torch.where(w.sum(2, keepdim=True) <= 0, torch.ones_like(w), w)

    def stats(flat, w):
        mean = (flat * w).sum(2) / w.sum(2)
        var = ((flat - mean[..., None]) ** 2 * w).sum(2) / w.sum(2)
        return mean, (var + 1e-6).sqrt()

    flat, w = x.flatten(2), weights(x)
    mean, std = stats(flat, w)
    z = (flat - mean[..., None]) / std[..., None]
    n = w.sum(2)
    skew, kurt = (z.pow(3) * w).sum(2) / n, (z.pow(4) * w).sum(2) / n - 3.0
    centres = torch.linspace(-4.0, 4.0, 16)
    logits = -((flat[..., None] - centres) ** 2) / (2.0 * (8.0 / 15 / 2.0) ** 2)
    hist = (logits.softmax(-1) * w[..., None]).sum(2) / n[..., None]
    feats = [torch.stack([mean, std, skew, kurt], dim=2).reshape(b, -1), hist.reshape(b, -1)]
    h = x
    for conv in enc.convs:
        h = F.relu(conv(h))
        feats += list(stats(h.flatten(2), weights(h)))
    return torch.cat(feats, dim=1)


@pytest.mark.parametrize(("channels", "h", "w"), [(1, 32, 32), (2, 17, 23), (1, 1, 1)])
def test_default_selection_is_the_original_encoder_bit_for_bit(channels, h, w):
    x = torch.randn(3, channels, h, w)
    mask = torch.rand(3, 1, h, w) > 0.4
    mask[0] = False  # an image without foreground counts all its pixels
    enc = FeatureEncoder(channels, seed=5)
    assert enc.features == DEFAULT_REWARD_FEATURES == ("moments", "histogram", "style")
    assert enc.groups == (4 * channels, 16 * channels, 64, 128, 256)
    for m in (None, mask):
        assert torch.equal(enc(x, m), original_features(enc, x, m))
    # the conv weights do not depend on the selection, and the state dict holds them only
    other = FeatureEncoder(channels, seed=5, features=("lowfreq", "style"))
    assert list(other.state_dict()) == list(enc.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), enc.parameters()))


def test_groups_follow_the_named_order_and_sizes():
    x, mask = torch.randn(2, 2, 24, 24), torch.rand(2, 1, 24, 24) > 0.3
    enc = FeatureEncoder(2, SMALL, features=("laplacian", "moments", "lowfreq", "fine_histogram"))
    assert enc.groups == (4 * 2, 4 * 2, 3 * 2, 48 * 2)
    alone = [FeatureEncoder(2, SMALL, features=(n,))(x, mask) for n in enc.features]
    assert torch.equal(enc(x, mask), torch.cat(alone, 1))
    everything = FeatureEncoder(2, SMALL, features=REWARD_FEATURES)
    assert everything.feature_dim == 8 + 32 + 2 * (8 + 16 + 32) + 96 + 8 + 6
    assert not any(p.requires_grad for p in everything.parameters())
    with pytest.raises(ValueError, match="lowfreq"):
        FeatureEncoder(1, features=("histogram", "sharpness"))


@pytest.mark.parametrize("name", NEW)
def test_new_groups_are_differentiable_finite_and_take_any_size(name):
    raw = heads(3, 24, seed=1)
    fg = raw > 0
    x = tissue_zscore(raw, fg).requires_grad_(True)
    enc = FeatureEncoder(1, features=(name,))
    enc(x, fg).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # through a reward built on the group alone, too
    reward = MMDReward(enc, tissue_zscore(raw, fg), ref_mask=fg)
    y = tissue_zscore(raw**2, fg).requires_grad_(True)
    loss = reward(y, fg)
    loss.backward()
    assert loss.item() > 0 and y.grad.abs().sum() > 0
    two = FeatureEncoder(2, SMALL, features=(name,))
    for h, w in [(1, 1), (3, 5), (9, 7)]:
        feats = two(torch.randn(2, 2, h, w))
        assert feats.shape == (2, two.feature_dim) and torch.isfinite(feats).all()


def test_laplacian_fine_band_falls_with_blur_and_rises_with_noise():
    raw = heads(6, 40, seed=2)
    fg = raw > 0
    enc = FeatureEncoder(1, features=("laplacian",))
    base = enc(tissue_zscore(raw, fg), fg)
    blurred = enc(tissue_zscore(blur(raw, 1.0) * fg, fg), fg)
    noise = 0.05 * torch.randn(raw.shape, generator=torch.Generator().manual_seed(3)) * fg
    noisy = enc(tissue_zscore(raw + noise, fg), fg)
    # level 0 is the finest band; the features are log energies
    assert (blurred[:, 0] < base[:, 0] - 0.5).all(), (base[:, 0], blurred[:, 0])
    assert (noisy[:, 0] > base[:, 0] + 0.1).all(), (base[:, 0], noisy[:, 0])


def test_laplacian_ignores_the_heads_outline():
    # a flat head on a background: all its band energy is the outline, which the tissue-
    # normalised pyramid leaves out; over the whole frame the outline dominates
    raw = heads(2, 32, seed=4, noise=0.0)
    fg = raw > 0
    flat = fg.float() * 0.7 - 1.0
    enc = FeatureEncoder(1, features=("laplacian",))
    inside, whole = enc(flat, fg), enc(flat)
    assert (inside < math.log(1e-5)).all(), inside
    assert (whole[:, 0] > math.log(1e-3)).all(), whole


def test_lowfreq_sees_a_smooth_bias_not_a_gain_or_where_the_tissue_lies():
    raw = heads(8, 40, seed=5)
    fg = raw > 0
    enc = FeatureEncoder(1, features=("lowfreq",))
    base = enc(tissue_zscore(raw, fg), fg)
    biased = enc(tissue_zscore(bias_field(raw, 0.3) * fg, fg), fg)
    # a global gain and offset changes nothing (the group z-scores the tissue itself)
    assert torch.allclose(enc(2.5 * tissue_zscore(raw, fg) + 0.7, fg), base, atol=1e-4)
    # the same heads moved by a few pixels in the frame
    moved, moved_fg = torch.roll(raw, (3, -4), (2, 3)), torch.roll(fg, (3, -4), (2, 3))
    shifted = enc(tissue_zscore(moved, moved_fg), moved_fg)
    bias_change = (biased - base).abs().mean().item()
    move_change = (shifted - base).abs().mean().item()
    assert bias_change > 0.05 and move_change < 0.3 * bias_change, (bias_change, move_change)
    # on average the class means spread further with the field
    assert biased.mean() > 1.3 * base.mean(), (base.mean(), biased.mean())


def test_fine_histogram_moves_further_than_the_default_under_a_close_gamma():
    # the same images under gamma 1.1, in units of the features' spread across images
    # (each group standardised as the reward standardises it): the narrower bins resolve
    # the small shift of the tissue peaks that the 16 bins average over
    raw_a, raw_b = heads(16, 32, seed=6) + 0.1, heads(16, 32, seed=7) + 0.1
    fg_a, fg_b = raw_a > 0.1, raw_b > 0.1
    a, b = tissue_zscore(raw_a, fg_a), tissue_zscore(raw_b, fg_b)
    b_gamma = tissue_zscore(raw_b**1.1, fg_b)
    moves = {}
    for name in ("histogram", "fine_histogram"):
        enc = FeatureEncoder(1, features=(name,))
        fa, fb, fg = enc(a, fg_a), enc(b, fg_b), enc(b_gamma, fg_b)
        scale = feature_scale(torch.cat([fa, fb]), enc.groups)
        moves[name] = (
            ((fg - fb) / scale).norm(dim=1).mean() / ((fa - fb) / scale).norm(dim=1).mean()
        ).item()
    assert moves["histogram"] > 0.05, moves
    assert moves["fine_histogram"] > 1.15 * moves["histogram"], moves


def test_each_group_alone_makes_a_working_mmd():
    # a contrast change of other subjects lies farther from the references than the
    # subjects themselves, for every group alone, scaled as the reward scales it
    refs = heads(8, 32, seed=8) + 0.1
    gen = heads(8, 32, seed=9) + 0.1
    fr, fgen = refs > 0.1, gen > 0.1
    for name in REWARD_FEATURES:
        enc = FeatureEncoder(1, SMALL, features=(name,))
        with torch.no_grad():
            ref_f = enc(tissue_zscore(refs, fr), fr)
            same = enc(tissue_zscore(gen, fgen), fgen)
            other = enc(tissue_zscore(gen**2.0, fgen), fgen)
            scale = feature_scale(torch.cat([same, ref_f]), enc.groups)
            bw = [
                m * float(median_distance(torch.cat([same, ref_f]) / scale))
                for m in MEDIAN_MULTIPLES
            ]
            near = mmd2(same / scale, ref_f / scale, bw).item()
            far = mmd2(other / scale, ref_f / scale, bw).item()
        assert far > near, (name, near, far)


def test_config_reward_features_validated_and_old_configs_load():
    assert AlignConfig().reward_features == DEFAULT_REWARD_FEATURES
    assert AlignConfig(reward_features=["laplacian", "lowfreq"]).reward_features == (
        "laplacian",
        "lowfreq",
    )
    # a --set override that is no Python literal arrives as a string
    assert AlignConfig(reward_features="laplacian, lowfreq").reward_features == (
        "laplacian",
        "lowfreq",
    )
    for bad in (("moments", "sharpness"), (), ("lowfreq", "lowfreq")):
        with pytest.raises(ValueError, match="moments, histogram, style, fine_histogram"):
            AlignConfig(reward_features=bad)
    # stored as JSON: a list comes back as the tuple; an older record has no such field
    cfg = AlignConfig(reward_features=("fine_histogram", "style"), k=3)
    assert AlignConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = AlignConfig(k=3).to_dict()
    del old["reward_features"]
    assert AlignConfig.from_dict(old) == AlignConfig(k=3)


def test_cli_reward_features_flag(tmp_path, capsys):
    argv = ["synth", "align", "--model", str(tmp_path / "m.pt"), "--references", str(tmp_path)]
    argv += ["--out", str(tmp_path / "out")]
    args = build_parser().parse_args([*argv, "--reward-features", "laplacian", "lowfreq"])
    cfg = _config_from_args(AlignConfig, args)
    assert cfg.reward_features == ("laplacian", "lowfreq")
    assert _config_from_args(AlignConfig, build_parser().parse_args(argv)) == AlignConfig()
    assert main([*argv, "--reward-features", "laplacian", "edges", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "edges" in err and "fine_histogram, laplacian, lowfreq" in err
    assert not (tmp_path / "out").exists()


def test_synth_align_uses_the_chosen_features(tmp_path):
    from medflow.synthesis.config import SynthConfig
    from medflow.synthesis.model import SynthModel
    from medflow.synthesis.train import train_synth

    source = make_nnunet_dataset(tmp_path / "src", n_train=2, n_test=1, shape=(16, 16, 3))
    tiny = dict(size=16, mask_channels=(8, 16), image_channels=(8, 16), batch_size=4)
    stage1 = train_synth(
        source, tmp_path / "s1", SynthConfig(steps=2, sample_steps=2, threads=1, **tiny), quiet=True
    )
    refs = source / "imagesTs"
    records = {}
    for features in (DEFAULT_REWARD_FEATURES, ("laplacian", "lowfreq")):
        cfg = AlignConfig(
            steps=1, batch_size=2, sampler_steps=2, threads=1, reward_features=features
        )
        out = align(stage1, refs, tmp_path / "_".join(features), cfg, quiet=True)
        records[features] = json.loads((out.parent / "align.json").read_text())
    new = records["laplacian", "lowfreq"]
    assert new["config"]["reward_features"] == ["laplacian", "lowfreq"]
    stored = SynthModel.load(tmp_path / "laplacian_lowfreq" / "synth.pt").alignment["config"]
    assert AlignConfig.from_dict(stored).reward_features == ("laplacian", "lowfreq")
    assert AlignConfig.from_dict(new["config"]).reward_features == ("laplacian", "lowfreq")
    # the same masks, noise and references: only the features differ, so does the reward
    assert new["reward_before"] != records[DEFAULT_REWARD_FEATURES]["reward_before"]
