import torch

from medflow.models.attention import DualBranchSpatialAttention, FrequencyAwareAttention


def test_dbsa_shape_and_gating_by_image():
    m = DualBranchSpatialAttention(8)
    h, g = torch.randn(2, 8, 12, 12), torch.randn(2, 8, 12, 12)
    out = m(h, g)
    assert out.shape == h.shape
    # with image features at zero, only the 1x1 projection biases enter, gated
    zero = m(h, torch.zeros_like(g))
    bias_loc, bias_glob = m.proj.bias.view(1, -1, 1, 1).chunk(2, dim=1)
    bound = bias_loc.abs() + bias_glob.abs()  # both gates lie in (0, 1)
    assert torch.all((zero - h).abs() <= bound + 1e-6)
    assert not torch.allclose(out, zero)


def test_dbsa_global_branch_handles_feature_maps_smaller_than_its_pool():
    m = DualBranchSpatialAttention(4, pool=8)
    assert m(torch.randn(1, 4, 3, 5), torch.randn(1, 4, 3, 5)).shape == (1, 4, 3, 5)


def test_faa_shape_time_modulation_and_spectral_sensitivity():
    torch.manual_seed(0)
    m = FrequencyAwareAttention(8, time_dim=16)
    h, g = torch.randn(2, 8, 12, 10), torch.randn(2, 8, 12, 10)
    temb = torch.randn(2, 16)
    out = m(h, g, temb)
    assert out.shape == h.shape
    assert not torch.allclose(out, m(h, g, torch.randn(2, 16)))  # time modulates
    # the spectral branch sees high frequencies of the image that the 3x3 spatial branch
    # would treat locally: changing one Fourier mode of g changes the output everywhere
    wave = torch.cos(torch.arange(12.0) * torch.pi / 2)[:, None].expand(12, 10)
    changed = m(h, g + wave, temb) - out
    assert (changed.abs().sum(1) > 1e-6).float().mean() > 0.9


def test_faa_gate_starts_small():
    m = FrequencyAwareAttention(8, time_dim=16)
    h = torch.randn(1, 8, 6, 6)
    out = m(h, torch.randn(1, 8, 6, 6), torch.randn(1, 16))
    # gate = 0.1 at initialisation: the module is a small perturbation of the identity
    assert (out - h).abs().mean() < 0.5 * h.abs().mean()
