import pytest
import torch

from medflow.flows.encoding import flow_to_mask, flow_to_probs, mask_to_flow
from medflow.flows.losses import MedFlowSegLoss, flow_matching_loss
from medflow.flows.parameterization import FlowField, logits_to_endpoint
from medflow.flows.paths import LinearPath


def test_mask_encoding_round_trip_and_range():
    mask = torch.tensor([[[0, 1, 2], [2, 2, 0]]])
    x = mask_to_flow(mask, 3)
    assert x.shape == (1, 3, 2, 3)
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    assert torch.all((x == 1).sum(1) == 1)  # exactly one hot channel per pixel
    assert torch.equal(flow_to_mask(x), mask)
    assert torch.equal(flow_to_probs(x), (x + 1) / 2)


def test_probs_of_off_simplex_state_are_normalised():
    x = torch.tensor([[[[0.5]], [[-2.0]], [[0.5]]]])  # channel 1 below -1: clipped at 0
    p = flow_to_probs(x)
    assert torch.allclose(p.sum(1), torch.ones(1, 1, 1))
    assert torch.allclose(p[0, :, 0, 0], torch.tensor([0.5, 0.0, 0.5]))


def test_probs_of_a_state_naming_no_class_are_uniform():
    # a clipped diffusion estimate can sit at -1 in every channel: no class, not zero mass
    x = torch.tensor([[[[-1.0, 1.0]], [[-1.0, -1.0]], [[-1.5, -1.0]]]])
    p = flow_to_probs(x)
    assert torch.allclose(p[0, :, 0, 0], torch.full((3,), 1 / 3))
    assert torch.allclose(p[0, :, 0, 1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(p.argmax(1), torch.tensor([[[0, 0]]]))


def test_endpoint_lies_on_the_scaled_simplex():
    e = logits_to_endpoint(torch.randn(2, 4, 3, 3) * 5)
    assert torch.all(e >= -1) and torch.all(e <= 1)
    assert torch.allclose(((e + 1) / 2).sum(1), torch.ones(2, 3, 3))


def test_velocity_loss_is_endpoint_loss_weighted_by_inverse_squared_gap():
    torch.manual_seed(0)
    mask = torch.randint(0, 3, (4, 5, 5))
    x1 = mask_to_flow(mask, 3)
    x0 = torch.randn_like(x1)
    t = torch.tensor([0.0, 0.2, 0.5, 0.7])
    s = LinearPath().sample(x0, x1, t)
    logits = torch.randn(4, 3, 5, 5)
    per_sample_end = [
        flow_matching_loss(
            logits[i : i + 1],
            LinearPath().sample(x0[i : i + 1], x1[i : i + 1], t[i : i + 1]),
            x1[i : i + 1],
            "endpoint",
            0.05,
        )
        for i in range(4)
    ]
    vel = flow_matching_loss(logits, s, x1, "velocity", 0.05)
    expected = sum(e / (1 - ti) ** 2 for e, ti in zip(per_sample_end, t.tolist())) / 4
    assert torch.allclose(vel, expected, rtol=1e-5)
    # and equals the direct velocity regression against x1 - x0
    v_hat = LinearPath.velocity_from_endpoint(logits_to_endpoint(logits), s.x_t, t, 0.05)
    assert torch.allclose(vel, (v_hat - s.dx_t).pow(2).mean(), rtol=1e-5)


def test_loss_is_minimised_by_the_true_mask():
    mask = torch.randint(0, 3, (2, 8, 8))
    x1 = mask_to_flow(mask, 3)
    s = LinearPath().sample(torch.randn_like(x1), x1, torch.rand(2))
    loss = MedFlowSegLoss()
    perfect = loss(x1 * 20.0, s, x1, mask)  # confident logits of the true mask
    wrong = loss(-x1 * 20.0, s, x1, mask)
    assert perfect.flow < 1e-6 and perfect.total < wrong.total
    assert perfect.seg < 0.01


def test_endpoint_velocity_one_step_lands_on_the_predicted_endpoint():
    class Net(torch.nn.Module):
        def forward(self, x, t, image, feats=None):
            return image * 3.0  # logits from the image alone

    image = torch.randn(2, 3, 4, 4)
    field = FlowField(Net())
    x0 = torch.randn(2, 3, 4, 4)
    x1 = x0 + field(x0, torch.zeros(2), field.condition(image))
    assert torch.allclose(x1, logits_to_endpoint(image * 3.0), atol=1e-6)


def test_velocity_parameterisation_is_plain_flow_matching():
    mask = torch.randint(0, 3, (2, 6, 6))
    x1 = mask_to_flow(mask, 3)
    s = LinearPath().sample(torch.randn_like(x1), x1, torch.rand(2))
    loss = MedFlowSegLoss(parameterization="velocity", seg_weight=0.0)
    out = torch.randn(2, 3, 6, 6)
    terms = loss(out, s, x1, mask)
    assert torch.allclose(terms.total, (out - s.dx_t).pow(2).mean())
    assert terms.seg == 0
    assert loss(s.dx_t, s, x1, mask).total == 0  # the true velocity has zero loss


def test_velocity_field_returns_the_raw_output_for_velocity_parameterisation():
    class Net(torch.nn.Module):
        def forward(self, x, t, image, feats=None):
            return image - x

    field = FlowField(Net(), parameterization="velocity")
    x, img = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    assert torch.equal(field(x, torch.zeros(1), field.condition(img)), img - x)
    with pytest.raises(ValueError, match="unknown parameterization"):
        FlowField(Net(), parameterization="score")
    with pytest.raises(ValueError, match="seg_weight must be 0"):
        MedFlowSegLoss(parameterization="velocity", seg_weight=1.0)
