"""The mask flow's options (issue 14): its own optimiser, longer training, slice positions,
the signed-distance encoding, and that stage 1 without them is what it always was."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_nnunet_dataset

from medflow.cli import main
from medflow.data.datasets import SliceSet
from medflow.engine.schedule import ema_update, lr_factor
from medflow.flows import mask_to_flow
from medflow.flows.encoding import mask_to_sdf, sdf_to_mask
from medflow.flows.losses import velocity_matching_loss
from medflow.synthesis.config import SynthConfig
from medflow.synthesis.image_flow import ImageFlow
from medflow.synthesis.mask_flow import MaskFlow, SlicePositions, presence
from medflow.synthesis.model import SynthModel
from medflow.synthesis.train import train_flows

TINY = dict(
    size=16,
    mask_channels=(8, 16),
    image_channels=(8, 16),
    batch_size=4,
    warmup_steps=2,
    threads=1,
    sample_steps=2,
)
# SynthConfig as stored before issue 14 (benchmarks/results/alignflow_stage1_config.json)
OLD_FIELDS = {
    "size",
    "slice_axis",
    "mask_channels",
    "image_channels",
    "steps",
    "batch_size",
    "lr",
    "warmup_steps",
    "ema_decay",
    "class_dropout",
    "hflip",
    "sample_steps",
    "seed",
    "threads",
}


def _slices(n: int = 12) -> SliceSet:
    """Squares of class 1 (and of class 2 in every other slice) that move with the slice's
    position, images that follow the masks."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, 16, 16, dtype=torch.uint8)
    for i in range(n):
        masks[i, i % 8 : i % 8 + 6, 3:9] = 1
        if i % 2:
            masks[i, 10:14, 10:14] = 2
    images = masks[:, None].float() + 0.1 * torch.randn(n, 1, 16, 16, generator=gen)
    positions = torch.arange(n, dtype=torch.float64) * 2.5 - 10.0
    return SliceSet(images, masks, [f"c{i // 4}" for i in range(n)], positions=positions)


def _old_stage1(slices: SliceSet, cfg: SynthConfig, k: int, c: int):
    """Stage 1's training loop as it was before issue 14, written out: one AdamW and one
    clip over both flows, one batch per step. Returns the EMA networks and the losses."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    mask_net = MaskFlow.build(k, cfg.mask_channels).net
    image_flow = ImageFlow.build(c, k, cfg.image_channels)
    nets = [mask_net, image_flow.net]
    emas = [copy.deepcopy(n).requires_grad_(False) for n in nets]
    params = [p for n in nets for p in n.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps)
    )
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(len(slices), (cfg.batch_size,), generator=gen)
        images, masks = slices.images[idx], slices.masks[idx]
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-2), images)
        masks = torch.where(flip[:, None, None], masks.flip(-2), masks)
        vec = torch.cat([presence(masks, k), torch.ones(cfg.batch_size, 1)], 1)
        keep = (torch.rand(cfg.batch_size, generator=gen) >= cfg.class_dropout).float()
        vec = vec * keep[:, None]
        x1 = mask_to_flow(masks, k)
        mask_loss = velocity_matching_loss(lambda x, t, v=vec: mask_net(x, t, None, v), x1, gen)
        image_loss = image_flow.loss(images, masks, gen)
        loss = mask_loss + image_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for ema, net in zip(emas, nets):
            ema_update(ema, net, cfg.ema_decay, step)
        losses.append((mask_loss.item(), image_loss.item()))
    return emas, losses


def _train(slices, cfg, **kw):
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    return train_flows(slices, 3, 1, cfg, torch.device("cpu"), gen, **kw)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_old_configs_read_as_before_and_the_joint_path_is_unchanged():
    record = Path(__file__).parents[2] / "benchmarks/results/alignflow_stage1_config.json"
    stage1 = SynthConfig.from_dict(json.loads(record.read_text())["config"])
    assert stage1 == SynthConfig(separate_optimisers=False)

    stored = {k: v for k, v in SynthConfig(steps=4, **TINY).to_dict().items() if k in OLD_FIELDS}
    cfg = SynthConfig.from_dict(json.loads(json.dumps(stored)))
    assert not cfg.separate_optimisers and not cfg.position_condition
    assert cfg.mask_encoding == "onehot" and not cfg.mask_postprocess
    assert cfg.mask_total_steps == 4

    slices = _slices()
    emas, losses = _old_stage1(slices, cfg, 3, 1)
    got = _train(slices, cfg)
    assert _same_weights(got.mask_flow.net, emas[0])
    assert _same_weights(got.image_flow.net, emas[1])
    assert [(r["mask_loss"], r["image_loss"]) for r in got.rows] == losses


def _scale_image_loss(monkeypatch, factor: float) -> None:
    plain = ImageFlow.loss
    monkeypatch.setattr(ImageFlow, "loss", lambda self, *a: factor * plain(self, *a))


@pytest.mark.parametrize("separate", [True, False])
def test_separate_optimisers_keep_the_image_loss_out_of_the_mask_update(monkeypatch, separate):
    cfg = SynthConfig(steps=4, separate_optimisers=separate, **TINY)
    slices = _slices()
    base = _train(slices, cfg)
    _scale_image_loss(monkeypatch, 50.0)
    scaled = _train(slices, cfg)
    assert not _same_weights(base.image_flow.net, scaled.image_flow.net)
    # jointly, the shared clip norm lets the image loss shrink the mask flow's step
    assert _same_weights(base.mask_flow.net, scaled.mask_flow.net) == separate


def test_mask_only_and_extra_mask_steps():
    slices = _slices()
    cfg = SynthConfig(steps=2, separate_optimisers=True, mask_steps=5, mask_lr=2e-3, **TINY)
    full = _train(slices, cfg)
    alone = _train(slices, cfg, mask_only=True)
    assert alone.image_flow is None
    assert _same_weights(full.mask_flow.net, alone.mask_flow.net)
    assert len(full.rows) == 5
    assert all("image_loss" in r for r in full.rows[:2])
    assert not any("image_loss" in r for r in full.rows[2:])
    assert all("mask_loss" in r for r in full.rows)
    # the mask flow's own schedule: warm-up to mask_lr, cosine to 0 at its 5th step
    assert full.rows[1]["mask_lr"] == pytest.approx(2e-3 * lr_factor(2, 2, 5))
    assert full.rows[1]["lr"] == pytest.approx(1e-3 * lr_factor(2, 2, 2))
    with pytest.raises(ValueError, match="mask_only needs separate_optimisers"):
        _train(slices, SynthConfig(steps=2, **TINY), mask_only=True)
    with pytest.raises(ValueError, match="need separate_optimisers"):
        SynthConfig(mask_steps=5)


def _position_flow() -> MaskFlow:
    positions = SlicePositions.from_mm(torch.tensor([-10.0, 0.0, 30.0]))
    return MaskFlow.build(3, (8, 16), positions=positions)


def test_slice_positions_map_and_draw():
    pos = SlicePositions.from_mm(torch.tensor([-10.0, 0.0, 30.0]))
    assert pos.train == (0.0, 0.25, 1.0)
    assert pos.relative(torch.tensor([10.0])).tolist() == [0.5]
    drawn = pos.draw(50, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) <= {0.0, 0.25, 1.0} and len(set(drawn.tolist())) == 3
    assert SlicePositions.from_dict(json.loads(json.dumps(pos.to_dict()))) == pos
    with pytest.raises(ValueError, match="two places"):
        SlicePositions.from_mm(torch.tensor([3.0, 3.0]))


def test_position_reaches_the_network():
    flow = _position_flow()
    torch.nn.init.normal_(flow.net.head[-1].weight)
    torch.nn.init.normal_(flow.net.vec.weight, std=3.0)

    def draw(p):
        gen = torch.Generator().manual_seed(1)
        return flow.sample(4, (16, 16), gen, steps=3, positions=torch.full((4,), p))

    assert torch.equal(draw(0.2), draw(0.2))
    assert not torch.equal(draw(0.0), draw(1.0))
    # without positions: drawn from the training slices' after the noise
    gen = torch.Generator().manual_seed(1)
    torch.randn((4, 3, 16, 16), generator=gen)
    drawn = flow.positions.draw(4, gen)
    got = flow.sample(4, (16, 16), torch.Generator().manual_seed(1), steps=3)
    want = flow.sample(4, (16, 16), torch.Generator().manual_seed(1), steps=3, positions=drawn)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="trained without slice positions"):
        MaskFlow.build(3, (8, 16)).condition(None, 2, torch.zeros(2))
    with pytest.raises(ValueError, match="needs its slice positions"):
        MaskFlow(flow.net)


def test_position_conditioned_flow_follows_its_position():
    """Class 1 sits at the top of the slice at position 0 and at the bottom at position 1:
    asked for either, the flow must put it there."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(8, 16, 16, dtype=torch.uint8)
    masks[:4, 1:6, 4:12] = 1
    masks[4:, 10:15, 4:12] = 1
    rel = torch.tensor([0.0] * 4 + [1.0] * 4)
    flow = MaskFlow.build(3, (8, 16), positions=SlicePositions(0.0, 1.0, (0.0, 1.0)))
    opt = torch.optim.Adam(flow.net.parameters(), lr=5e-3)
    for _ in range(80):
        opt.zero_grad()
        flow.loss(masks, gen, 0.2, rel).backward()
        opt.step()
    rows = torch.arange(16.0)[None, :, None]
    # the squares' centre rows are 3 and 12
    for p, lo, hi in ((0.0, 1, 5), (1.0, 10, 14)):
        drawn = flow.sample(4, (16, 16), gen, steps=8, positions=torch.full((4,), p))
        fg = (drawn == 1).float()
        centre = float((fg * rows).sum() / fg.sum().clamp_min(1))
        assert lo <= centre <= hi, (p, centre)


def test_cli_trains_with_the_options_and_the_checkpoint_records_them(tmp_path, capsys):
    src = make_nnunet_dataset(tmp_path / "ds", n_train=3, n_test=1)
    flags = ["--size", "16", "--mask-channels", "8,16", "--image-channels", "8,16"]
    flags += ["--batch-size", "4", "--threads", "1", "--sample-steps", "2", "--quiet"]
    run = ["synth", "train", "--data", str(src), "--out", str(tmp_path / "r")] + flags
    new = ["--separate-optimisers", "--mask-lr", "3e-4", "--mask-steps", "3"]
    new += ["--position-condition", "--mask-encoding", "sdf", "--mask-postprocess"]
    assert main(run + ["--steps", "2"] + new) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert cfg["mask_lr"] == 3e-4 and cfg["mask_steps"] == 3 and cfg["separate_optimisers"]
    model = SynthModel.load(tmp_path / "r" / "synth.pt")
    flow = model.mask_flow
    # conftest's volumes: case i's slice k at z = 2 i + 2.5 k (k < 5), three training cases
    assert (flow.positions.low_mm, flow.positions.high_mm) == (0.0, 14.0)
    assert len(flow.positions.train) == 15 and flow.encoding == "sdf"
    assert flow.cleanup.min_size == 8 and flow.net.cfg.vector_dim == 3 + 8
    # synth sample draws positions and cleans its masks without being told
    syn = ["synth", "sample", "--model", str(tmp_path / "r" / "synth.pt"), "--n", "2"]
    assert main(syn + ["--out", str(tmp_path / "syn"), "--quiet"]) == 0
    assert (tmp_path / "syn" / "dataset.json").is_file()

    # a checkpoint written before the options existed: one-hot, no positions, no clean-up
    model.mask_flow = MaskFlow.build(3, (8, 16))
    torch.nn.init.normal_(model.mask_flow.net.head[-1].weight)
    payload_path = model.save(tmp_path / "plain.pt")
    payload = torch.load(payload_path, weights_only=True)
    del payload["mask_flow"]
    torch.save(payload, tmp_path / "old.pt")
    old = SynthModel.load(tmp_path / "old.pt").mask_flow
    assert old.options() == MaskFlow.build(3, (8, 16)).options()
    a = old.sample(3, (16, 16), torch.Generator().manual_seed(0), 2)
    assert torch.equal(a, model.mask_flow.sample(3, (16, 16), torch.Generator().manual_seed(0), 2))

    # bad values: one line, exit code 2
    assert main(run + ["--force", "--mask-lr", "3e-4"]) == 2
    assert "need separate_optimisers" in capsys.readouterr().err
    assert main(run + ["--force", "--mask-encoding", "distance"]) == 2
    assert "mask_encoding must be" in capsys.readouterr().err
    png = make_nnunet_dataset(tmp_path / "png", n_train=2, n_test=1, ending=".png")
    bad = ["synth", "train", "--data", str(png), "--out", str(tmp_path / "p")] + flags
    assert main(bad + ["--position-condition"]) == 2
    err = capsys.readouterr().err
    assert "position_condition" in err and "2D images" in err and len(err.splitlines()) == 1


def _label_maps() -> torch.Tensor:
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 3, size=(3, 16, 16)).astype(np.uint8)  # speckle of three classes
    maps[1] = 0
    maps[1, 4:12, 2:14] = 1  # a block of class 1, no class 2 at all
    maps[1, 6:9, 6:9] = 0  # with a hole
    maps[2] = 2  # class 2 fills the slice
    return torch.from_numpy(maps)


def test_sdf_round_trip_and_shape():
    maps = _label_maps()
    x = mask_to_sdf(maps, 3, width=3.0)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(sdf_to_mask(x), maps.long())
    assert float(x.abs().max()) <= 1.0
    assert bool((x[1, 2] == -1).all()) and bool((x[2, 2] == 1).all())
    # a pixel's own class is the one positive channel; across the block's edge the state
    # changes by tanh(0.5 / w) steps, not from -1 to 1 as one-hot does
    assert torch.equal((x > 0).sum(1), torch.ones(3, 16, 16, dtype=torch.long))
    edge = float(x[1, 1, 4, 8])
    assert edge == pytest.approx(np.tanh(0.5 / 3.0), rel=1e-5)
    # deeper inside is further from the boundary: the state grows monotonically
    column = x[1, 1, 4:8, 3]
    assert bool((column[1:] >= column[:-1]).all())
    with pytest.raises(ValueError, match="width"):
        mask_to_sdf(maps, 3, width=0.0)


def test_sdf_mask_flow_trains_on_signed_distances():
    flow = MaskFlow.build(3, (8, 16), encoding="sdf", sdf_width=2.0)
    maps = _label_maps()
    assert torch.equal(flow.encode(maps), mask_to_sdf(maps, 3, 2.0))
    assert torch.equal(flow.decode(flow.encode(maps)), maps.long())
    loss = flow.loss(maps, torch.Generator().manual_seed(0), 0.2)
    assert torch.isfinite(loss) and loss.item() > 0
    with pytest.raises(ValueError, match="unknown mask encoding"):
        MaskFlow(flow.net, encoding="distance")
