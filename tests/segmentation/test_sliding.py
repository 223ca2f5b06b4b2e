"""Sliding-window inference: windows of the training patch blended back to the slice's own
size, with each sample's noise one field over the whole slice."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from torch import nn

from medflow.errors import OptionError
from medflow.models.unet import SegNet
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.inference import SamplingOptions, diffusion_probs, flow_probs
from medflow.segmentation.methods import method_for
from medflow.segmentation.sliding import window_probs

PATCH = (16, 16)
TINY = dict(channels=(8, 16), dbsa=False, faa=False)
CONFIGS = {
    "unet": TrainConfig(model="unet", **TINY),
    # dropout: a network left in training mode would predict something else
    "unet-dropout": TrainConfig(model="unet", dropout=0.5, **TINY),
    "flow": TrainConfig(shortcut_fraction=0.0, **TINY),
    "shortcut": TrainConfig(**TINY),
    "diffusion": TrainConfig(model="diffusion", **TINY),
}
# a diffusion model's default is DDIM-50: three steps test the same path
OPTIONS = {"diffusion": SamplingOptions(sampler="ddim", steps=3)}


def _setup(kind, seed=0):
    method = method_for(CONFIGS[kind])
    torch.manual_seed(seed)
    return method, SegNet(method.net_config(1, 3)), OPTIONS.get(kind, SamplingOptions())


def _drawn(n, shape, samples, seed):
    """The noise inference.py draws: ``(N, K, H, W)`` per sample, sample j from seed + j."""
    return [
        torch.randn((n, 3, *shape), generator=torch.Generator().manual_seed(seed + j))
        for j in range(samples)
    ]


@pytest.mark.parametrize("size", [(16, 16), (12, 10), (16, 9)])
def test_a_unet_on_a_slice_no_bigger_than_the_patch_predicts_the_padded_slice(size):
    # "padded the same way": zeros, half of the missing rows (columns) before the slice and
    # the rest, one more when odd, after; the output is cropped back to the slice
    method, net, options = _setup("unet-dropout")
    x = torch.randn(2, 1, *size)
    top, left = (PATCH[0] - size[0]) // 2, (PATCH[1] - size[1]) // 2
    pad = (left, PATCH[1] - size[1] - left, top, PATCH[0] - size[0] - top)
    net.train()
    got = window_probs(method, net, x, options, PATCH)
    assert net.training  # run in eval mode, its mode restored
    want = method.probs(net.eval(), F.pad(x, pad), options)
    want = want[..., top : top + size[0], left : left + size[1]]
    assert got.shape == (2, 3, *size) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_a_flows_padded_slice_starts_from_its_noise_padded_with_zeros():
    method, net, options = _setup("flow")
    x = torch.randn(1, 1, 12, 10)
    got = window_probs(method, net, x, SamplingOptions(seed=3), PATCH)
    pad = (3, 3, 2, 2)
    noise = [F.pad(z, pad) for z in _drawn(1, (12, 10), 1, 3)]
    want = method.probs(net, F.pad(x, pad), options, noise=noise)[..., 2:14, 3:13]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["unet", "flow"])
def test_a_slice_larger_than_the_patch_keeps_its_shape_and_each_window_its_noise(kind):
    method, net, options = _setup(kind)
    x = torch.randn(2, 1, 40, 28)
    got = window_probs(method, net, x, options, PATCH)
    assert got.shape == (2, 3, 40, 28)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 40, 28))
    assert got.min() >= 0
    noise = _drawn(2, (40, 28), 1, 0)
    # windows start at rows 0, 8, 16, 24 and columns 0, 8, 12 (overlap 0.5): the corners
    # seen by one window alone are that window's prediction from its cut of the slice's noise
    for (rows, cols), (keep_r, keep_c) in [
        ((slice(0, 16), slice(0, 16)), (slice(0, 8), slice(0, 8))),
        ((slice(24, 40), slice(12, 28)), (slice(8, 16), slice(12, 16))),
    ]:
        cut = [z[..., rows, cols] for z in noise] if kind != "unet" else None
        alone = method.probs(net, x[..., rows, cols], options, noise=cut)
        window = got[..., rows, cols][..., keep_r, keep_c]
        torch.testing.assert_close(window, alone[..., keep_r, keep_c], atol=1e-6, rtol=0)


def test_overlapping_windows_blend_by_monais_gaussian_weights():
    method, net, options = _setup("unet")
    x = torch.randn(1, 1, 16, 24)  # two windows, columns 0..16 and 8..24
    got = window_probs(method, net, x, options, PATCH)
    left = method.probs(net, x[..., :16], options)
    right = method.probs(net, x[..., 8:], options)
    w = compute_importance_map(PATCH, mode="gaussian")  # (16, 16)
    # columns 8..16 are the left window's last half and the right window's first half
    wl, wr = w[:, 8:], w[:, :8]
    want = (wl * left[..., 8:] + wr * right[..., :8]) / (wl + wr)
    torch.testing.assert_close(got[..., 8:16], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got[..., :8], left[..., :8], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[..., 16:], right[..., 8:], atol=1e-6, rtol=0)
    assert (left[..., 8:] - right[..., :8]).abs().max() > 1e-2  # the windows disagree there


def _shift_equivariant(net: SegNet) -> SegNet:
    """``net`` with every 3 x 3 kernel cut to its centre and no GroupNorm: its output at a
    pixel no longer depends on where the window's borders are, only on the pixel (and on its
    2 x 2 block, through the stride-2 level), so windows starting at even offsets must blend
    into the whole slice's prediction."""
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            with torch.no_grad():
                centre = module.weight[:, :, 1, 1].clone()
                module.weight.zero_()
                module.weight[:, :, 1, 1] = centre
        if isinstance(module, nn.GroupNorm):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, nn.Identity())
    return net


@pytest.mark.parametrize("kind", ["unet", "flow", "diffusion"])
def test_the_blend_of_a_shift_equivariant_network_is_seamless(kind):
    method, net, options = _setup(kind)
    net = _shift_equivariant(net)
    options = dataclasses.replace(options, samples=2)
    x = torch.randn(2, 1, 40, 28)  # windows at even offsets: rows 0..24, columns 0, 8, 12
    got = window_probs(method, net, x, options, PATCH, per_sample=True)
    # the same noise as the whole slice's (seed + j, drawn for the whole set), so any seam
    # (a misplaced window, a wrong weight, noise drawn per window) shows as a difference
    want = method.probs(net, x, options, per_sample=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_unet_constant_on_a_constant_image_blends_to_that_constant():
    method, net, options = _setup("unet")
    net = _shift_equivariant(net)
    got = window_probs(method, net, torch.full((1, 1, 40, 28), 0.7), options, PATCH)
    window = method.probs(net, torch.full((1, 1, 16, 16), 0.7), options)
    assert (window - window[..., :1, :1]).abs().max() < 1e-6  # the model is constant
    torch.testing.assert_close(got, window[..., :1, :1].expand_as(got), atol=1e-6, rtol=0)


def test_an_ensemble_is_the_mean_of_its_samples_and_sample_j_is_seed_plus_j():
    method, net, _ = _setup("shortcut")
    x = torch.randn(2, 1, 24, 20)
    ensemble = SamplingOptions(samples=3, seed=4)
    per = window_probs(method, net, x, ensemble, PATCH, per_sample=True)
    assert per.shape == (3, 2, 3, 24, 20)
    torch.testing.assert_close(per.mean(0), window_probs(method, net, x, ensemble, PATCH))
    for j in range(3):
        one = window_probs(method, net, x, SamplingOptions(seed=4 + j), PATCH)
        torch.testing.assert_close(per[j], one)
    assert (per[0] - per[1]).abs().max() > 1e-3  # the samples do differ


@pytest.mark.parametrize("kind", ["unet", "flow"])
def test_results_do_not_depend_on_the_window_batch_or_the_chunk_of_slices(kind):
    method, net, _ = _setup(kind)
    x = torch.randn(3, 1, 24, 20)
    ref = window_probs(method, net, x, SamplingOptions(samples=2), PATCH, per_sample=True)
    for batch_size, sw in [(1, 1), (2, 3), (3, None)]:
        options = SamplingOptions(samples=2, batch_size=batch_size)
        got = window_probs(method, net, x, options, PATCH, per_sample=True, sw_batch_size=sw)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_noise_passed_explicitly_reproduces_the_drawn_noise():
    _, flow_net, _ = _setup("flow")
    _, diff_net, _ = _setup("diffusion")
    x = torch.randn(3, 1, 16, 16)
    noise = _drawn(3, (16, 16), 2, 7)
    drawn = flow_probs(flow_net, x, samples=2, seed=7, batch_size=2)
    assert torch.equal(flow_probs(flow_net, x, samples=2, batch_size=2, noise=noise), drawn)
    other = flow_probs(flow_net, x, samples=2, noise=_drawn(3, (16, 16), 2, 8))
    assert (other - drawn).abs().max() > 1e-3  # the given noise is the one used
    for sampler in ("ddim", "ddpm"):
        kw = dict(steps=3, sampler=sampler, samples=2, batch_size=2)
        drawn = diffusion_probs(diff_net, x, seed=7, **kw)
        assert torch.equal(diffusion_probs(diff_net, x, seed=7, noise=noise, **kw), drawn)
    with pytest.raises(ValueError, match="noise: expected 2 tensors"):
        flow_probs(flow_net, x, samples=2, noise=noise[:1])


def test_ancestral_ddpm_is_refused_under_sliding_windows():
    method, net, _ = _setup("diffusion")
    with pytest.raises(OptionError, match="ddpm"):
        window_probs(method, net, torch.randn(1, 1, 20, 20), SamplingOptions(sampler="ddpm"), PATCH)


def test_default_windows_keep_the_pixels_of_a_fixed_size_batch():
    from medflow.segmentation.sliding import default_windows

    assert default_windows(32, (96, 96)) == 32
    assert default_windows(32, (128, 128)) == 18
    assert default_windows(32, (512, 512)) == 1  # a CT patch: one window per call
