import pytest
import torch

from medflow.flows.encoding import mask_to_flow
from medflow.flows.losses import MedFlowSegLoss
from medflow.flows.paths import LinearPath
from medflow.models.attention import DualBranchSpatialAttention, FrequencyAwareAttention
from medflow.models.unet import NetConfig, SegNet, count_parameters

TINY = (8, 16, 16)


def flow_net(**kw):
    return SegNet(NetConfig(in_channels=2, num_classes=3, channels=TINY, **kw))


def test_flow_net_shapes():
    net = flow_net()
    out = net(torch.randn(2, 3, 16, 24), torch.rand(2), torch.randn(2, 2, 16, 24))
    assert out.shape == (2, 3, 16, 24)


def test_plain_unet_takes_only_the_image():
    net = SegNet(NetConfig(in_channels=2, num_classes=3, channels=TINY, flow=False))
    assert net(torch.randn(2, 2, 16, 16)).shape == (2, 3, 16, 16)
    assert net.time is None and not hasattr(net, "dbsa") and not hasattr(net, "faa")


def test_bad_inputs_are_rejected_with_the_shape():
    net = flow_net()
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.randn(1, 3, 10, 16), torch.rand(1), torch.randn(1, 2, 10, 16))
    with pytest.raises(ValueError, match=r"image must be \(B, 2, H, W\)"):
        net(torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 1, 16, 16))


def test_gradients_reach_every_parameter():
    net = flow_net()
    x, t, img = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 2, 16, 16)
    net(x, t, img).pow(2).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_output_depends_on_time_state_and_image():
    net = flow_net().eval()
    x, img = torch.randn(1, 3, 16, 16), torch.randn(1, 2, 16, 16)
    base = net(x, torch.tensor([0.2]), img)
    assert not torch.allclose(base, net(x, torch.tensor([0.7]), img))
    assert not torch.allclose(base, net(torch.randn_like(x), torch.tensor([0.2]), img))
    assert not torch.allclose(base, net(x, torch.tensor([0.2]), torch.randn_like(img)))


def test_cached_image_features_give_the_same_output():
    net = flow_net().eval()
    x, t, img = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 2, 16, 16)
    assert torch.allclose(net(x, t, img), net(x, t, img, feats=net.image_features(img)))


def test_ablation_switches_remove_the_modules():
    full, no_dbsa, no_faa = flow_net(), flow_net(dbsa=False), flow_net(faa=False)
    assert any(isinstance(m, DualBranchSpatialAttention) for m in full.modules())
    assert not any(isinstance(m, DualBranchSpatialAttention) for m in no_dbsa.modules())
    assert not any(isinstance(m, FrequencyAwareAttention) for m in no_faa.modules())
    assert count_parameters(no_dbsa) < count_parameters(full)
    assert count_parameters(no_faa) < count_parameters(full)
    # every variant still runs
    for net in (no_dbsa, no_faa, flow_net(dbsa=False, faa=False)):
        assert net(torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 2, 16, 16)).shape == (
            1,
            3,
            16,
            16,
        )


def test_config_round_trip():
    cfg = NetConfig(in_channels=1, num_classes=2, channels=[8, 16], faa=False)
    assert NetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        NetConfig(in_channels=1, num_classes=1)


def test_overfits_one_batch():
    torch.manual_seed(0)
    img = torch.randn(4, 2, 16, 16)
    # a mask the image determines: class by the sign of channel 0, plus a square of class 2
    mask = (img[:, 0] > 0).long()
    mask[:, 4:8, 4:8] = 2
    net = flow_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn, path = MedFlowSegLoss(), LinearPath()
    x1 = mask_to_flow(mask, 3)
    for _ in range(150):
        t = torch.rand(4)
        s = path.sample(torch.randn_like(x1), x1, t)
        loss = loss_fn(net(s.x_t, t, img), s, x1, mask).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    # one step from fresh noise reproduces the training masks
    logits = net.eval()(torch.randn_like(x1), torch.zeros(4), img)
    acc = (logits.argmax(1) == mask).float().mean().item()
    assert acc > 0.97


def test_without_image_branch_the_image_enters_only_at_the_stem():
    net = flow_net(dbsa=False, faa=False, image_branch=False)
    assert not hasattr(net, "cond_stem") and net.image_features(torch.randn(1, 2, 16, 16)) is None
    out = net(torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 2, 16, 16))
    assert out.shape == (1, 3, 16, 16)
    assert count_parameters(net) < count_parameters(flow_net(dbsa=False, faa=False))
    with pytest.raises(ValueError, match="need the image branch"):
        NetConfig(in_channels=1, num_classes=2, image_branch=False)
