"""Largest-component post-processing: chosen per class on validation, applied by predict."""

import json

import nibabel as nib
import numpy as np

from medflow.engine.checkpoint import load_checkpoint, save_checkpoint
from medflow.segmentation.config import TrainConfig
from medflow.segmentation.postprocess import case_volumes, choose_largest, keep_largest
from medflow.segmentation.predict import predict_folder
from medflow.segmentation.train import train


def test_keep_largest_removes_the_smaller_islands_of_the_named_classes_only():
    labels = np.zeros((10, 10, 3), dtype=np.int16)
    labels[0:4, 0:4, 1] = 1  # 16 voxels
    labels[8, 8, 0] = 1  # a stray voxel of class 1
    labels[6, 0:2, 2] = 2  # two components of class 2, left alone
    labels[0, 8, 2] = 2
    out = keep_largest(labels, [1])
    assert out[8, 8, 0] == 0 and (out[0:4, 0:4, 1] == 1).all()
    assert (out == 2).sum() == 3 and labels[8, 8, 0] == 1  # the input is untouched
    # diagonal neighbours are one component (full connectivity)
    diag = np.zeros((4, 4), dtype=np.int16)
    diag[0, 0] = diag[1, 1] = 1
    assert (keep_largest(diag, [1]) == diag).all()
    assert keep_largest(labels, []) is labels


def test_a_class_keeps_it_only_where_validation_dice_rises():
    ref = np.zeros((2, 8, 8), dtype=np.int16)
    ref[:, 1:4, 1:4] = 1
    ref[:, 5:7, 5:7] = 2
    ref[0, 0, 7] = 2  # class 2 truly has a second component
    pred = ref.copy()
    pred[1, 7, 0] = 1  # a false island of class 1
    chosen = choose_largest([pred], [ref], 3)
    assert chosen["largest_component"] == [1]
    assert chosen["validation_dice"]["1"]["after"] > chosen["validation_dice"]["1"]["before"]
    assert chosen["validation_dice"]["2"]["after"] < chosen["validation_dice"]["2"]["before"]


def test_case_volumes_regroups_consecutive_slices():
    labels = np.arange(5)[:, None, None] * np.ones((5, 2, 2), dtype=np.int16)
    groups = case_volumes(labels, ["a", "a", "b", "b", "b"])
    assert [c for c, _ in groups] == ["a", "b"] and [v.shape[0] for _, v in groups] == [2, 3]


def test_training_chooses_it_and_predict_applies_it_unless_told_not_to(tiny_dataset, tmp_path):
    from conftest import TINY_TRAIN

    cfg = TrainConfig(**{**TINY_TRAIN, "steps": 2, "val_fraction": 0.5})
    result = train(tiny_dataset, tmp_path / "run", cfg, quiet=True)
    written = json.loads((result.run_dir / "postprocessing.json").read_text())
    assert load_checkpoint(result.final_checkpoint)["postprocessing"] == written
    # force the choice, so the effect is visible on a tiny, barely trained model
    ckpt = load_checkpoint(result.final_checkpoint)
    save_checkpoint(tmp_path / "pp.pt", {**ckpt, "postprocessing": {"largest_component": [1, 2]}})
    predict_folder(tmp_path / "pp.pt", tiny_dataset / "imagesTs", tmp_path / "on", quiet=True)
    predict_folder(
        tmp_path / "pp.pt", tiny_dataset / "imagesTs", tmp_path / "off", quiet=True,
        postprocess=False,
    )  # fmt: skip
    for path in sorted((tmp_path / "off").glob("*.nii.gz")):
        off = np.asarray(nib.load(str(path)).dataobj)
        on = np.asarray(nib.load(str(tmp_path / "on" / path.name)).dataobj)
        assert (on == keep_largest(off, [1, 2])).all()
