import pytest
import torch

from medflow.flows.samplers import euler, heun, one_step, refine


def constant(c):
    return lambda x, t, cond: c.expand_as(x)


def test_euler_integrates_a_constant_field_exactly():
    x0, c = torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4)
    for steps in (1, 3, 8):
        assert torch.allclose(euler(constant(c), x0, None, steps), x0 + c, atol=1e-6)


def test_heun_is_exact_for_a_field_linear_in_time_up_to_its_final_euler_step():
    # dx/dt = t: each trapezoidal Heun step integrates it exactly; the last step is Euler
    # by design (the endpoint-parameterised velocity is singular at t = 1)
    def field(x, t, cond):
        return t.view(-1, 1, 1, 1).expand_as(x)

    x0 = torch.zeros(2, 1, 2, 2)
    expected = 0.75**2 / 2 + 0.25 * 0.75  # exact on [0, 3/4], Euler on [3/4, 1]
    assert torch.allclose(heun(field, x0, None, 4), torch.full_like(x0, expected), atol=1e-6)
    euler_value = 0.25 * (0 + 0.25 + 0.5 + 0.75)
    assert torch.allclose(euler(field, x0, None, 4), torch.full_like(x0, euler_value), atol=1e-6)


def test_one_step_equals_one_euler_step_and_counts_one_evaluation():
    calls = []

    def field(x, t, cond):
        calls.append(t.clone())
        return torch.sin(x) + cond

    x0, cond = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    out = one_step(field, x0, cond)
    assert len(calls) == 1 and torch.all(calls[0] == 0)
    assert torch.allclose(out, x0 + torch.sin(x0) + cond)
    assert torch.equal(out, euler(field, x0, cond, 1))


def test_step_counts():
    calls = []

    def field(x, t, cond):
        calls.append(1)
        return torch.zeros_like(x)

    euler(field, torch.zeros(1, 1, 2, 2), None, 5)
    assert len(calls) == 5
    calls.clear()
    heun(field, torch.zeros(1, 1, 2, 2), None, 5)
    assert len(calls) == 9  # two per step, one for the final Euler step


def test_bad_step_count():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        euler(constant(torch.zeros(1)), torch.zeros(1, 1, 1, 1), None, 0)


def test_euler_with_grad_matches_euler_and_carries_gradients():
    from medflow.flows.samplers import euler, euler_with_grad

    w = torch.tensor(0.7, requires_grad=True)

    def velocity(x, t, cond):
        return w * x + t[:, None] + cond

    x0, cond = torch.randn(3, 2), torch.ones(3, 2)
    seen = []
    out = euler_with_grad(velocity, x0, cond, steps=4, on_step=lambda x, t, v: seen.append(t[0]))
    assert torch.allclose(out, euler(velocity, x0, cond, steps=4))
    assert [float(t) for t in seen] == [0.0, 0.25, 0.5, 0.75]
    (g_ckpt,) = torch.autograd.grad(out.sum(), w)
    plain = euler_with_grad(velocity, x0, cond, steps=4, checkpoint=False)
    (g_plain,) = torch.autograd.grad(plain.sum(), w)
    # recomputing each step in the backward pass changes memory, not the gradient
    assert g_ckpt != 0 and torch.allclose(g_ckpt, g_plain)


def recording(calls):
    """A nonlinear field that records the state and time of every evaluation."""

    def field(x, t, cond):
        calls.append((x.clone(), t.clone()))
        return torch.sin(3 * x) + t.view(-1, 1, 1, 1)

    return field


def test_refine_is_euler_on_a_grid_that_jumps_from_0_to_its_start():
    calls = []
    x0 = torch.randn(2, 3, 4, 4)
    out = refine(recording(calls), x0, None, 4, start=0.4)
    assert [round(float(t[0]), 6) for _, t in calls] == [0.0, 0.4, 0.6, 0.8]  # 4 evaluations
    x = x0
    for a, b in ((0.0, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)):
        x = x + (b - a) * (torch.sin(3 * x) + a)
    assert torch.allclose(out, x, atol=1e-5)
    # plain Euler with n steps is the start 1 / n
    assert torch.allclose(
        refine(recording([]), x0, None, 4, start=0.25), euler(recording([]), x0, None, 4), atol=1e-6
    )


def test_refine_renoises_the_one_step_estimate_and_at_start_1_returns_it():
    x0, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    estimate = one_step(recording([]), x0)
    calls = []
    refine(recording(calls), x0, None, 3, start=0.3, noise=z)
    assert torch.allclose(calls[1][0], 0.7 * z + 0.3 * estimate, atol=1e-6)  # fresh noise
    calls.clear()
    assert torch.equal(refine(recording(calls), x0, None, 5, start=1.0), estimate)
    assert len(calls) == 5  # the evaluations are the steps asked for, even when they move nothing
    calls.clear()
    assert torch.equal(refine(recording(calls), x0, None, 1), estimate) and len(calls) == 1
    for start in (0.0, 1.5):
        with pytest.raises(ValueError, match="start must be in"):
            refine(recording([]), x0, None, 2, start=start)
    with pytest.raises(ValueError, match="noise must have shape"):
        refine(recording([]), x0, None, 2, noise=torch.zeros(1, 3, 4, 4))
