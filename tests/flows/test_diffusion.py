import math

import pytest
import torch

from medflow.flows.diffusion import (
    DiffusionSchedule,
    ddim,
    ddim_step,
    ddpm,
    ddpm_posterior,
    ddpm_step,
    network_time,
    q_sample,
    sampling_steps,
    start_from_eps,
)
from medflow.flows.losses import epsilon_loss

LINEAR = DiffusionSchedule.linear()
# three steps with round numbers: abar = 0.9, 0.72, 0.36
SMALL = DiffusionSchedule(torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64))


def test_linear_schedule_is_ddpm_s():
    assert LINEAR.num_steps == 1000
    assert LINEAR.betas[0].item() == pytest.approx(1e-4)
    assert LINEAR.betas[-1].item() == pytest.approx(0.02)
    abar = LINEAR.alphas_bar
    assert torch.all(abar[1:] < abar[:-1])  # strictly decreasing: every step adds noise
    assert abar[0].item() == pytest.approx(1 - 1e-4)
    # at T the mask is gone: signal amplitude sqrt(abar) below 1 % of the noise's
    assert 0 < abar[-1].item() < 5e-5
    assert LINEAR.alpha_bar(-1) == 1.0 and LINEAR.alpha_bar(999) == abar[-1].item()
    assert SMALL.alphas_bar.tolist() == pytest.approx([0.9, 0.72, 0.36])
    with pytest.raises(ValueError, match="step must be in"):
        LINEAR.alpha_bar(1000)


def test_q_sample_has_the_forward_process_statistics():
    gen = torch.Generator().manual_seed(0)
    x_start = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1).expand(20000, 2, 4, 4)
    i = torch.full((20000,), 300)
    x = q_sample(x_start, i, torch.randn(x_start.shape, generator=gen), LINEAR)
    abar = LINEAR.alphas_bar[300].item()
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    assert mean.tolist() == pytest.approx([abar**0.5, -(abar**0.5)], abs=0.01)
    assert std.tolist() == pytest.approx([(1 - abar) ** 0.5] * 2, abs=0.01)
    # one step per sample: row 0 nearly clean, row 1 nearly pure noise
    eps = torch.randn(2, 2, 4, 4, generator=gen)
    x = q_sample(x_start[:2], torch.tensor([0, 999]), eps, LINEAR)
    assert torch.allclose(x[0], x_start[0], atol=0.05)
    assert torch.allclose(x[1], eps[1], atol=0.01)
    with pytest.raises(ValueError, match=r"i must have shape \(2,\)"):
        q_sample(x_start[:2], torch.tensor([1]), eps, LINEAR)


def test_start_from_eps_inverts_q_sample_and_clips():
    x_start = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x_start)
    for i in (0, 10, 500, 999):
        x_t = q_sample(x_start, torch.full((3,), i), eps, LINEAR)
        assert torch.allclose(start_from_eps(x_t, i, eps, LINEAR), x_start, atol=1e-9)
    # a wrong noise guess at high noise throws the estimate far out; clipping bounds it
    x_t = q_sample(x_start, torch.full((3,), 999), eps, LINEAR)
    wild = start_from_eps(x_t, 999, eps + 0.5, LINEAR, clip=False)
    assert wild.abs().max() > 10
    clipped = start_from_eps(x_t, 999, eps + 0.5, LINEAR)
    assert clipped.min() == -1.0 and clipped.max() <= 1.0


def test_sampling_steps_descend_from_the_last_training_step():
    assert sampling_steps(10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert sampling_steps(1000) == list(range(999, -1, -1))
    assert sampling_steps(1) == [999]
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="steps must be in"):
            sampling_steps(bad)


def test_network_time_is_step_over_t():
    t = network_time(torch.tensor([0, 250, 999]))
    assert t.dtype == torch.float32 and t.tolist() == pytest.approx([0.0, 0.25, 0.999])


@pytest.mark.parametrize("steps", [1, 10, 50, 1000])
def test_ddim_with_a_perfect_noise_oracle_recovers_the_mask_on_the_forward_path(steps):
    # x_T is built from x_start with noise eps0; an oracle that always answers eps0 is exact
    # on the whole path, and DDIM (eta = 0) must then visit q_sample(x_start, s, eps0) at
    # every step s and end exactly at x_start
    gen = torch.Generator().manual_seed(1)
    x_start = torch.where(torch.rand(2, 3, 4, 4, generator=gen) > 0.5, 1.0, -1.0).double()
    x_start[0, 0, 0, 0] = 0.3  # a soft value, inside the clipping range
    eps0 = torch.randn(x_start.shape, generator=gen, dtype=torch.float64)
    x_end = q_sample(x_start, torch.full((2,), 999), eps0, LINEAR)
    visited = []

    def oracle(x, i, cond):
        assert i.dtype == torch.long and i.shape == (2,) and cond == "c"
        expected = q_sample(x_start, i, eps0, LINEAR)
        visited.append(torch.allclose(x, expected, atol=1e-9))
        return eps0

    out = ddim(oracle, x_end, "c", steps, LINEAR)
    assert len(visited) == steps and all(visited)
    assert torch.allclose(out, x_start, atol=1e-9)


def test_ddim_step_recomputes_the_noise_from_the_clipped_estimate():
    x_t = torch.tensor([[[[1.0]]]], dtype=torch.float64)
    eps = torch.tensor([[[[-2.0]]]], dtype=torch.float64)  # implies x_start = (1 + 1.6) / 0.6
    out = ddim_step(x_t, eps, 2, 1, SMALL)  # abar_2 = 0.36, abar_1 = 0.72
    # x_start clipped to 1; eps' = (1 - 0.6 * 1) / 0.8 = 0.5
    assert out.item() == pytest.approx(0.72**0.5 * 1.0 + 0.28**0.5 * 0.5)
    assert ddim_step(x_t, eps, 2, -1, SMALL).item() == 1.0  # the last step returns x_start
    with pytest.raises(ValueError, match="need -1 <= s < i"):
        ddim_step(x_t, eps, 1, 1, SMALL)


def test_ddpm_step_mean_and_variance_by_hand():
    # DDPM eq. 7 at t = 2 (abar_2 = 0.36, abar_1 = 0.72, beta_2 = 0.5), x_start = 0.5, x_t = 1:
    # mean = sqrt(0.72) * 0.5 / 0.64 * 0.5 + sqrt(0.5) * 0.28 / 0.64 * 1 = 0.6408155...
    # var = 0.5 * 0.28 / 0.64 = 0.21875
    x_t = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    mean, var = ddpm_posterior(x_t, torch.full_like(x_t, 0.5), 2, 1, SMALL)
    assert mean.item() == pytest.approx(0.6408155, abs=1e-7)
    assert var == pytest.approx(0.21875)
    # the same through the noise prediction: eps = (1 - 0.6 * 0.5) / 0.8 = 0.875 means x_start 0.5
    eps = torch.full_like(x_t, 0.875)
    z = torch.full_like(x_t, 2.0)
    assert ddpm_step(x_t, eps, 2, 1, SMALL, 0 * z).item() == pytest.approx(0.6408155, abs=1e-7)
    assert ddpm_step(x_t, eps, 2, 1, SMALL, z).item() == pytest.approx(
        0.6408155 + 2 * math.sqrt(0.21875), abs=1e-7
    )
    # the last step (abar_0 = 0.9 to the data) lands on x_start = 0.5 and adds no noise
    last = ddpm_step(x_t, (x_t - 0.9**0.5 * 0.5) / 0.1**0.5, 0, -1, SMALL, z)
    assert last.item() == pytest.approx(0.5)


@pytest.mark.parametrize("steps", [3, 2])
def test_ddpm_with_an_oracle_keeps_the_forward_marginals(steps):
    # with an oracle that knows x_start, every ancestral step (stride 1 or respaced) must take
    # samples of q(x_i | x_start) to samples of q(x_s | x_start): checks mean and variance
    x_start = torch.tensor(0.4, dtype=torch.float64)
    n = 200000
    gen = torch.Generator().manual_seed(2)
    x_end = q_sample(
        x_start.expand(n, 1, 1, 1),
        torch.full((n,), 2),
        torch.randn(n, 1, 1, 1, generator=gen, dtype=torch.float64),
        SMALL,
    )
    seen = {}

    def oracle(x, i, cond):
        abar = SMALL.alphas_bar[i[0]].item()
        seen[int(i[0])] = (x.mean().item(), x.var().item())
        return (x - abar**0.5 * x_start) / (1 - abar) ** 0.5

    out = ddpm(
        oracle,
        x_end,
        None,
        steps,
        SMALL,
        noise=lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype),
    )
    assert sorted(seen) == sorted(sampling_steps(steps, 3))
    for i, (mean, var) in seen.items():
        abar = SMALL.alphas_bar[i].item()
        assert mean == pytest.approx(abar**0.5 * 0.4, abs=0.01), i
        assert var == pytest.approx(1 - abar, abs=0.01), i
    assert torch.allclose(out, x_start.expand_as(out))


def test_samplers_call_the_model_once_per_step():
    calls = []

    def model(x, i, cond):
        calls.append(int(i[0]))
        return torch.zeros_like(x)

    x = torch.randn(2, 2, 4, 4)
    ddim(model, x, None, 50)
    assert calls == sampling_steps(50)
    calls.clear()
    out = ddpm(model, x, None, 1000)
    assert calls == list(range(999, -1, -1))
    assert out.abs().max() <= 1.0  # the end state is a clipped mask estimate


def test_epsilon_loss_is_the_mean_squared_noise_error():
    eps = torch.zeros(2, 3, 4, 4)
    eps_hat = torch.zeros_like(eps)
    eps_hat[0, 0, 0, 0] = 4.0
    terms = epsilon_loss(eps_hat, eps)
    assert terms.total.item() == pytest.approx(16.0 / eps.numel())
    assert terms.flow.item() == terms.total.item() and terms.seg.item() == 0.0
