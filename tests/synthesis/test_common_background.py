"""Stage 1 trains on every case with its zero background at the common level
(``train.common_background``): z-scored case by case, the zero background of each case lands
at a level of its own, which the image flow would otherwise learn as dim frames that
``synth sample`` writes as tissue."""

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_SYNTH, make_nnunet_dataset, skull_strip

import medflow.synthesis.train as stage1
from medflow.data.datasets import SliceSet
from medflow.synthesis.config import SynthConfig
from medflow.synthesis.model import SynthModel
from medflow.synthesis.sample import source_slices


def _case_minima(slices: SliceSet) -> dict[str, float]:
    ids = np.asarray(slices.case_ids)
    return {c: float(slices.images[torch.from_numpy(ids == c)].min()) for c in set(ids)}


def test_each_case_shifted_to_the_level_and_cases_without_background_untouched():
    a = torch.full((2, 1, 4, 4), -1.0)
    a[:, :, 1:3, 1:3] = torch.tensor([[0.5, 1.0], [1.5, 2.0]])
    b = a + 1.7  # another case: its background at +0.7, the same head above it
    c = torch.linspace(0.0, 3.0, 32).reshape(2, 1, 4, 4)  # no background: one pixel at min
    slices = SliceSet(torch.cat([a, b, c]), torch.zeros(6, 4, 4), ["a"] * 2 + ["b"] * 2 + ["c"] * 2)
    out = stage1.common_background(slices, -2.0)
    x = out.images
    assert x[:4].min() == -2.0 and (x[:4] == -2.0).sum() == 4 * 12  # both backgrounds moved
    torch.testing.assert_close(x[:2] - x[:2].min(), a - a.min())  # the head rides along
    torch.testing.assert_close(x[2:4], x[:2])  # the two cases now read the same
    torch.testing.assert_close(x[4:], c)
    assert slices.images[2:4].min() == pytest.approx(0.7)  # the input is not modified
    assert stage1.common_background(slices, None) is slices


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A skull-stripped tiny source whose last two training cases are brighter: z-scored on
    their own, their zero backgrounds land lower than the first two cases'."""
    root = skull_strip(make_nnunet_dataset(tmp_path_factory.mktemp("src") / "ds", n_train=4))
    for path in sorted(root.glob("imagesTr/case0[23]_0000.nii.gz")):
        img = nib.load(path)
        data = img.get_fdata().astype(np.float32)
        data[data != 0] += 150.0
        nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return root


def test_stage1_trains_on_one_background_level_and_source_slices_match(
    source, tmp_path, monkeypatch
):
    _, as_read, _ = stage1.load_source(source, 16)
    minima = _case_minima(as_read)
    assert max(minima.values()) - min(minima.values()) > 1.0  # the cases disagree as read
    seen = []

    def spy(slices, *args, **kwargs):
        seen.append(slices)
        return real(slices, *args, **kwargs)

    real = stage1.train_flows
    monkeypatch.setattr(stage1, "train_flows", spy)
    cfg = SynthConfig(steps=2, **TINY_SYNTH)
    model = SynthModel.load(stage1.train_synth(source, tmp_path / "s1", cfg, quiet=True))
    trained = seen[0]
    for case, low in _case_minima(trained).items():
        assert low == pytest.approx(model.background_level, abs=1e-5), case
    # the head above the background is what the reader made of it
    ids = np.asarray(as_read.case_ids)
    for case in set(ids):
        rows = torch.from_numpy(ids == case)
        x, y = as_read.images[rows], trained.images[rows]
        torch.testing.assert_close(y - y.min(), x - x.min())
    # the real-mask route and SDEdit start from the same images stage 1 trained on
    torch.testing.assert_close(source_slices(source, model).images, trained.images)
