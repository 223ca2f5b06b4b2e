"""Fusion and uncertainty maps on hand-made samples ``(S, N, K, H, W)``."""

import math

import numpy as np
import pytest
import torch

from medflow.uncertainty.fusion import SampleStats, fuse, stats_of
from medflow.uncertainty.maps import entropy_map


def one_hot(labels, k=2):
    """``(N, H, W)`` labels -> one-hot probabilities ``(N, K, H, W)``."""
    t = torch.as_tensor(labels)
    return torch.nn.functional.one_hot(t, k).permute(0, 3, 1, 2).float()


def test_identical_samples_have_exactly_zero_variance():
    probs = torch.rand(2, 3, 5, 4)
    probs = probs / probs.sum(1, keepdim=True)
    stats = stats_of(torch.stack([probs] * 5))
    assert stats.count == 5
    assert torch.equal(stats.variance, torch.zeros(2, 5, 4))
    assert torch.allclose(stats.mean, probs)
    # the fused entropy is the entropy of the one sample, not zero
    assert torch.allclose(entropy_map(stats.mean), entropy_map(probs))
    assert entropy_map(probs).min() > 0


def test_two_one_hot_samples_disagreeing_on_one_pixel():
    a = one_hot([[[0, 1], [1, 0]]])
    b = one_hot([[[0, 1], [1, 1]]])  # disagrees at (1, 1) only
    stats = stats_of(torch.stack([a, b]))
    entropy = entropy_map(stats.mean)
    expected = torch.tensor([[[0.0, 0.0], [0.0, math.log(2)]]])
    assert torch.allclose(entropy, expected, atol=1e-6)
    assert entropy[0, 0, 0] == 0.0  # 0 ln 0 counts as 0: a certain pixel is exactly 0
    # each class probability is 0 or 1, half and half: variance 1/4, summed over 2 classes
    assert torch.allclose(stats.variance, torch.tensor([[[0.0, 0.0], [0.0, 0.5]]]))


def test_three_classes_split_evenly_reach_the_maxima():
    samples = torch.stack([one_hot([[[c]]], k=3) for c in range(3)])
    stats = stats_of(samples)
    assert stats.variance.item() == pytest.approx(1 - 1 / 3)
    assert entropy_map(stats.mean).item() == pytest.approx(math.log(3))


def test_variance_matches_numpy_over_many_samples():
    gen = torch.Generator().manual_seed(1)
    samples = torch.softmax(torch.randn(7, 2, 3, 4, 4, generator=gen), dim=2)
    expected = np.var(samples.numpy().astype(np.float64), axis=0).sum(1)
    assert np.allclose(stats_of(samples).variance.numpy(), expected, atol=1e-6)
    assert np.allclose(stats_of(samples).mean.numpy(), samples.mean(0).numpy(), atol=1e-6)


def test_majority_vote_differs_from_the_mean_where_it_should():
    confident = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    lukewarm = torch.tensor([0.3, 0.4, 0.3]).view(1, 3, 1, 1)
    # two samples lean to class 1, one is sure of class 0: the mean says 0, the vote says 1
    samples = torch.stack([confident, lukewarm, lukewarm])
    assert fuse(samples, "mean").item() == 0
    assert fuse(samples, "vote").item() == 1
    shares = stats_of(samples).vote_shares.flatten()
    assert torch.allclose(shares, torch.tensor([1 / 3, 2 / 3, 0.0]))


def test_a_tied_vote_goes_to_the_class_with_the_higher_mean():
    a = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    b = torch.tensor([0.4, 0.6]).view(1, 2, 1, 1)
    assert fuse(torch.stack([a, b]), "vote").item() == 0  # one vote each; mean 0.65 vs 0.35
    c = torch.tensor([0.45, 0.55]).view(1, 2, 1, 1)
    d = torch.tensor([0.51, 0.49]).view(1, 2, 1, 1)
    assert fuse(torch.stack([c, d]), "vote").item() == 1  # mean 0.48 vs 0.52


def test_bad_input_is_refused():
    stats = SampleStats()
    with pytest.raises(ValueError, match="no samples"):
        _ = stats.mean
    stats.add(torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="differs from the first sample"):
        stats.add(torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="unknown fusion 'median'"):
        stats.scores("median")
