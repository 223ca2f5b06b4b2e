"""The mask flow and the image flow at tiny size: conditioning, sampling, learning."""

import pytest
import torch

from medflow.synthesis.image_flow import ImageFlow
from medflow.synthesis.mask_flow import MaskFlow, presence


def test_presence_vector():
    masks = torch.zeros(2, 4, 4, dtype=torch.uint8)
    masks[0, 0, 0] = 2
    masks[1, 1, 1] = 1
    masks[1, 2, 2] = 3
    assert presence(masks, 4).tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


def test_condition_vector_and_its_checks():
    flow = MaskFlow.build(3, (8, 16))
    assert flow.condition(None, 2).tolist() == [[0.0, 0.0, 0.0]] * 2
    assert flow.condition(torch.tensor([[1.0, 0.0]]), 1).tolist() == [[1.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match=r"classes must be \(1, 2\)"):
        flow.condition(torch.ones(1, 3), 1)


def test_samples_are_label_maps_and_reproducible():
    flow = MaskFlow.build(3, (8, 16))
    torch.nn.init.normal_(flow.net.head[-1].weight)
    a = flow.sample(3, (16, 16), torch.Generator().manual_seed(1), steps=2)
    b = flow.sample(3, (16, 16), torch.Generator().manual_seed(1), steps=2)
    assert a.dtype == torch.uint8 and a.shape == (3, 16, 16) and int(a.max()) <= 2
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown sampler"):
        flow.sample(1, (16, 16), torch.Generator(), sampler="rk4")


def _train(step_loss, params, steps=150, lr=5e-3):
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        step_loss().backward()
        opt.step()


def test_class_conditioned_mask_flow_follows_its_condition():
    """Two kinds of mask: a square of class 1 or of class 2. Conditioned on 'class 2
    present', the flow must draw class 2 and not class 1."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(8, 16, 16, dtype=torch.uint8)
    masks[:4, 4:12, 4:12] = 1
    masks[4:, 4:12, 4:12] = 2
    flow = MaskFlow.build(3, (8, 16))
    _train(lambda: flow.loss(masks, gen, class_dropout=0.2), flow.net.parameters())
    want = torch.tensor([[0.0, 1.0]] * 4)
    drawn = flow.sample(4, (16, 16), torch.Generator().manual_seed(3), steps=10, classes=want)
    assert (drawn == 2).sum() > 10 * max(1, int((drawn == 1).sum()))


def test_image_flow_paints_the_classes_of_its_mask():
    """Images are brightness 0 / 1 / 2 by class; generated images for held-out masks must
    order the classes' mean intensities the same way."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(8, 16, 16, dtype=torch.uint8)
    for i in range(8):
        masks[i, i : i + 6, 2:8] = 1
        masks[i, 3:9, 8 + i % 4 : 14 + i % 4] = 2
    images = masks[:, None].float() + 0.05 * torch.randn(8, 1, 16, 16, generator=gen)
    flow = ImageFlow.build(1, 3, (8, 16))
    _train(lambda: flow.loss(images, masks, gen), flow.net.parameters(), steps=200)
    test = torch.zeros(2, 16, 16, dtype=torch.uint8)
    test[:, 8:14, 1:7] = 2
    test[:, 1:6, 9:15] = 1
    out = flow.sample(test, torch.Generator().manual_seed(5), steps=8)[:, 0]
    means = [float(out[test == c].mean()) for c in range(3)]
    assert means[0] < means[1] < means[2], means
    assert abs(means[2] - 2.0) < 0.5
