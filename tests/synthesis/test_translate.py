"""Translation from real masks (issue 14): stage 2 and sampling for the source's real masks,
from noise or from partly noised real images (``AlignConfig.masks`` / ``start_time``)."""

import json

import numpy as np
import pytest
import test_synth_pipeline as pipeline
import torch
from conftest import make_nnunet_dataset

from medflow.cli import main
from medflow.data.datasets import load_slices, plan_preprocessing
from medflow.data.layout import load_dataset
from medflow.errors import MedflowError
from medflow.flows.samplers import euler_with_grad
from medflow.synthesis import harness
from medflow.synthesis.align import align
from medflow.synthesis.config import AlignConfig
from medflow.synthesis.harness import HarnessConfig, conditions, contrasts
from medflow.synthesis.image_flow import ImageFlow
from medflow.synthesis.mask_flow import MaskFlow
from medflow.synthesis.model import SynthModel
from medflow.synthesis.sample import real_pairs, sample_dataset, source_slices

# the pipeline tests' tiny source and stage-1 model (module-scoped: built once here)
source = pipeline.source
stage1 = pipeline.stage1

TINY_ALIGN = {"steps": 1, "batch_size": 2, "sampler_steps": 2, "threads": 1}


@pytest.mark.parametrize("start", [0.25, 0.5])
def test_translation_starts_at_the_partly_noised_image(start):
    flow = ImageFlow.build(1, 3, (8, 16))  # untrained: the zero field
    masks = torch.randint(3, (4, 16, 16), generator=torch.Generator().manual_seed(0))
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    noise = flow.noise(masks, torch.Generator().manual_seed(1))
    x_t0 = (1 - start) * noise + start * images

    def draw(**kwargs):
        return flow.sample(masks, torch.Generator().manual_seed(1), 3, **kwargs)

    assert torch.equal(draw(start=start, images=images), x_t0)
    with torch.no_grad():
        flow.net.head[-1].bias.fill_(0.7)  # a constant field v = 0.7
    # Euler from t0 to 1 only: a constant field moves x_t0 by (1 - t0) v
    assert torch.allclose(draw(start=start, images=images), x_t0 + (1 - start) * 0.7, atol=1e-6)
    assert torch.allclose(draw(), noise + 0.7, atol=1e-6)  # from noise: all of [0, 1]

    # with gradients: the steps visited are t0 .. 1 only, and the reward's gradient on the
    # field is (1 - t0) of the full route's
    times = []
    x1 = flow.sample_with_grad(
        masks, x_t0, 3, on_step=lambda x, t, v: times.append(float(t[0])), start=start
    )
    assert times == pytest.approx([start + (1 - start) * i / 3 for i in range(3)])
    x1.sum().backward()
    assert flow.net.head[-1].bias.grad.item() == pytest.approx((1 - start) * x1.numel(), rel=1e-5)
    # the noise route is unchanged: the samplers' own Euler
    cond = flow.encode(masks)
    with torch.no_grad():
        assert torch.equal(
            flow.sample_with_grad(masks, noise, 3), euler_with_grad(flow.velocity, noise, cond, 3)
        )
    with pytest.raises(ValueError, match="needs the euler sampler and images"):
        draw(start=start)
    with pytest.raises(ValueError, match="needs the euler sampler and images"):
        draw(start=start, images=images, sampler="heun")


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def _spy_on_alignment(monkeypatch) -> list:
    """Record (masks, start state, start time) of every image-flow integration; the mask
    flow must not be sampled, and the noise is zero, so a start state is t0 * real image."""
    seen = []
    original = ImageFlow.sample_with_grad

    def spy(self, masks, x0, steps, *args, **kwargs):
        seen.append((masks.clone(), x0.detach().clone(), kwargs.get("start")))
        return original(self, masks, x0, steps, *args, **kwargs)

    def no_mask_flow(*args, **kwargs):
        raise AssertionError("the mask flow was sampled")

    monkeypatch.setattr(ImageFlow, "sample_with_grad", spy)
    monkeypatch.setattr(MaskFlow, "sample", no_mask_flow)
    monkeypatch.setattr(
        ImageFlow, "noise", lambda self, m, gen: torch.zeros(m.shape[0], 1, *m.shape[-2:])
    )
    return seen


def test_real_masks_and_start_time_through_align_and_sample(
    stage1, source, tmp_path, capsys, monkeypatch
):
    refs = pipeline._references(tmp_path / "refs", source)
    real = source_slices(source, SynthModel.load(stage1))
    seen = _spy_on_alignment(monkeypatch)
    argv = ["synth", "align", "--model", str(stage1), "--references", str(refs), "--k", "1"]
    tiny = ["--steps", "2", "--batch-size", "2", "--sampler-steps", "2", "--threads", "1"]
    route = ["--real-masks", "--source", str(source), "--start-time", "0.5"]
    out = tmp_path / "al"
    assert main([*argv, "--out", str(out), *tiny, *route, "--quiet"]) == 0
    monkeypatch.undo()

    # before, two steps, after: every batch is real source masks, started at 0.5 * its image
    assert len(seen) == 4
    for masks, x0, start in seen:
        assert start == 0.5
        for m, x in zip(masks, x0):
            match = [j for j in range(len(real)) if torch.equal(real.masks[j], m)]
            assert match and any(torch.allclose(x, 0.5 * real.images[j]) for j in match)

    # the checkpoint records the route, and sampling uses it
    model = SynthModel.load(out / "synth.pt")
    assert model.alignment["masks"] == "real" and model.alignment["start_time"] == 0.5
    assert model.alignment["source"] == str(source.resolve()) and model.sample_steps == 2
    assert json.loads((out / "align.json").read_text())["pool_masks"] == len(real)
    masks, images = real_pairs(source, model, 6, seed=3)
    syn = tmp_path / "syn"
    meta = sample_dataset(out / "synth.pt", syn, 6, seed=3, masks=masks, images=images, quiet=True)
    assert meta["medflow"]["start_time"] == 0.5 and meta["medflow"]["masks"] == "given"
    written = load_slices(load_dataset(syn).training, written_prep(syn), 3)
    assert torch.equal(written.masks, masks)
    expected = model.image_flow.sample(
        masks, torch.Generator().manual_seed(3), 2, start=0.5, images=images
    )
    from_noise = model.image_flow.sample(masks, torch.Generator().manual_seed(3), 2)

    def corr(a, b):
        return np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]

    # read back re-normalised: the translated images up to an affine map, not the others
    assert corr(written.images, expected) > 0.9999 and corr(written.images, from_noise) < 0.995

    # a translating model needs the real images; the CLI draws them from --real-masks
    _fails(
        capsys,
        ["synth", "sample", "--model", str(out / "synth.pt"), "--out", "s2", "--n", "4"],
        "translates real images from t0=0.5",
    )
    assert not (tmp_path / "s2").exists()
    cli = ["synth", "sample", "--model", str(out / "synth.pt"), "--n", "6", "--seed", "3"]
    assert main([*cli, "--out", str(tmp_path / "s3"), "--real-masks", str(source), "--quiet"]) == 0
    again = load_slices(load_dataset(tmp_path / "s3").training, written_prep(tmp_path / "s3"), 3)
    assert torch.equal(again.images, written.images) and torch.equal(again.masks, masks)

    # an alignment recorded before translation existed samples from noise
    ckpt = torch.load(out / "synth.pt", weights_only=True)
    for key in ("masks", "start_time", "source"):
        del ckpt["alignment"][key]
    torch.save(ckpt, tmp_path / "old.pt")
    meta = sample_dataset(tmp_path / "old.pt", tmp_path / "s4", 2, quiet=True)
    assert meta["medflow"]["start_time"] == 0.0 and meta["medflow"]["masks"] == "mask flow"


def written_prep(folder):
    spec = load_dataset(folder)
    return plan_preprocessing(spec, spec.training, (16, 16))


def test_bad_routes_are_refused(stage1, source, tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match="needs masks 'real'"):
        AlignConfig(start_time=0.5)
    with pytest.raises(ValueError, match="masks must be 'flow' or 'real'"):
        AlignConfig(masks="atlas")
    with pytest.raises(ValueError, match=r"start_time must be in \[0, 1\)"):
        AlignConfig(masks="real", start_time=1.0)
    with pytest.raises(MedflowError, match="needs the labelled source dataset"):
        align(stage1, tmp_path, tmp_path / "al", AlignConfig(masks="real", **TINY_ALIGN))
    assert not (tmp_path / "al").exists()
    model = SynthModel.load(stage1)
    two = make_nnunet_dataset(tmp_path / "two", n_train=1, n_test=0, channels=2)
    with pytest.raises(MedflowError, match="has 2 channel"):
        real_pairs(two, model, 4, seed=0)
    with pytest.raises(MedflowError, match="images are given with their masks"):
        sample_dataset(stage1, tmp_path / "s", 2, images=torch.zeros(2, 1, 16, 16))

    monkeypatch.chdir(tmp_path)
    refs = pipeline._references(tmp_path / "refs", source)
    argv = ["synth", "align", "--model", str(stage1), "--references", str(refs), "--out", "al"]
    _fails(capsys, [*argv, "--start-time", "0.5"], "needs masks 'real' (got --start-time 0.5)")
    _fails(capsys, [*argv, "--real-masks"], "needs the labelled source dataset (--source DATA)")
    _fails(capsys, [*argv, "--source", str(source)], "is read only with --real-masks")
    assert not (tmp_path / "al").exists()


def test_an_old_align_config_loads_as_the_mask_flow_route():
    old = {
        "k": 5,
        "steps": 100,
        "batch_size": 8,
        "sampler_steps": 4,
        "lr": 1e-3,
        "reg_weight": 1.0,
        "encoder_seed": 0,
        "checkpointing": True,
        "seed": 0,
        "threads": None,
    }
    cfg = AlignConfig.from_dict(old)
    assert (cfg.masks, cfg.start_time) == ("flow", 0.0)
    assert AlignConfig.from_dict(cfg.to_dict()) == cfg
    new = AlignConfig.from_dict({**old, "masks": "real", "start_time": 0.5})
    assert (new.masks, new.start_time) == ("real", 0.5)


def test_translation_arms_only_when_selected_and_their_contrasts():
    default = [c.name for c in conditions(HarnessConfig(ks=(1,), oracle=False), 20)]
    assert not any("translated" in name for name in default)
    for old in ("source+unaligned, 4 steps", "source+stage-1 on real masks", "source+augmented"):
        assert old in default
    cfg = HarnessConfig(
        ks=(1, 5),
        baselines=("real_masks", "translated", "translated_sdedit"),
        sdedit_start=0.25,
        oracle=False,
    )
    conds = conditions(cfg, 20)
    names = [c.name for c in conds]
    assert names == [
        "source",
        "source+unaligned",
        "source+stage-1 on real masks",
        "source+aligned K=1",
        "source+aligned K=5",
        "source+translated K=1",
        "source+translated K=5",
        "source+translated t0=0.25 K=1",
        "source+translated t0=0.25 K=5",
    ]
    # seed s, arm i scores (10 i + s) % so every difference is known
    rows = [
        {"condition": n, "seed": s, "foreground": {"dice": (10 * i + s) / 100, "iou": i / 100}}
        for i, n in enumerate(names)
        for s in (0, 1)
    ]
    got = {(c["condition"], c["versus"]): c["dice"] for c in contrasts(conds, rows, cfg.ks)}
    assert got[("source+translated K=1", "source+stage-1 on real masks")] == pytest.approx(30)
    assert got[("source+translated K=5", "source+aligned K=5")] == pytest.approx(20)
    assert got[("source+translated t0=0.25 K=5", "source+translated K=5")] == pytest.approx(20)
    assert ("source+translated K=1", "source+unaligned") not in got
    with pytest.raises(ValueError, match="sdedit_start must be in"):
        HarnessConfig(sdedit_start=1.0)


def test_a_translation_arm_has_its_own_alignment_and_reuse_reads_it_back(
    stage1, source, tmp_path, monkeypatch
):
    target = tmp_path / "target"
    pipeline._references(target / "references", source)
    cfg = HarnessConfig(
        ks=(1,), seeds=(0,), n_synthetic=6, baselines=("translated_sdedit",), align=TINY_ALIGN
    )
    (arm,) = [c for c in conditions(cfg, 3) if c.baseline == "translated_sdedit"]
    assert arm.name == "source+translated t0=0.5 K=1"

    def run(reuse):
        return harness._Harness(
            source, target, tmp_path / "out", cfg, {0: stage1}, "cpu", reuse, lambda m: None
        )

    h = run(reuse=False)
    path = arm.build(h, 0)
    assert path == tmp_path / "out" / "datasets" / "translated_t0.5_k1_seed0"
    record = h.alignment["translated t0=0.5 K=1"][0]
    assert record["start_time"] == 0.5 and record["masks"] == "real"
    assert sorted(p.name for p in (tmp_path / "out" / "synth").iterdir()) == [
        "translate_t0.5_k1_seed0"
    ]  # not the mask-flow route's align_k1_seed0
    meta = json.loads((path / "dataset.json").read_text())["medflow"]
    assert meta["start_time"] == 0.5 and meta["synthetic_pairs"] == 6
    # the same real masks as every real-mask arm of seed 0
    synth = [c for c in load_dataset(path).training if c.case_id.startswith("synth_")]
    written = load_slices(synth, written_prep(path), 3)
    assert torch.equal(written.masks, real_pairs(source, SynthModel.load(stage1), 6, 0)[0])

    def fail(*args, **kwargs):
        raise AssertionError("recomputed what --reuse should read back")

    monkeypatch.setattr(harness, "align", fail)
    monkeypatch.setattr(harness, "sample_dataset", fail)
    again = run(reuse=True)
    assert arm.build(again, 0) == path
    assert again.alignment["translated t0=0.5 K=1"][0] == record
