import math

import numpy as np
import pytest

from medflow.data.naming import map_name, split_map_name
from medflow.uncertainty.maps import case_uncertainty, png_scale


def test_case_uncertainty_is_entropy_per_predicted_foreground_voxel():
    entropy = np.zeros((4, 4, 1), np.float32)
    entropy[0, 0, 0] = 0.6  # doubt outside the predicted structure counts too
    entropy[1, 1, 0] = 0.2
    labels = np.zeros((4, 4, 1), np.int16)
    labels[1:3, 1:3, 0] = 1  # 4 foreground voxels
    assert case_uncertainty(entropy, labels) == pytest.approx(0.8 / 4)
    # predicted empty: divided by one voxel, so the doubt stands out
    assert case_uncertainty(entropy, np.zeros_like(labels)) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="differs from labels shape"):
        case_uncertainty(entropy, labels[:2])


def test_map_names_round_trip():
    assert map_name("case01", "entropy", ".nii.gz") == "case01_entropy.nii.gz"
    assert split_map_name("case01_variance") == ("case01", "variance")
    assert split_map_name("case01") is None and split_map_name("_entropy") is None
    assert png_scale("entropy", 3) == pytest.approx(math.log(3))
    assert png_scale("variance", 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown uncertainty map"):
        map_name("c", "std", ".png")
