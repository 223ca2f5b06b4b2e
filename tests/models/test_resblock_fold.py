"""The residual block folds one shared time modulation into GroupNorm's affine: the same
function as the per-row scale-and-shift it replaces."""

import torch

from medflow.models.embeddings import ResBlock


def test_a_shared_time_gives_the_per_row_modulation():
    block = ResBlock(8, 16, time_dim=12).eval()
    torch.nn.init.normal_(block.film.weight)  # a modulation far from identity
    x = torch.randn(3, 8, 10, 10)
    row, other = torch.randn(1, 12), torch.randn(1, 12)
    with torch.no_grad():
        shared = block(x, row.expand(3, 12))  # one t for the batch: the folded path
        # each image beside one with another time: rows differ, the per-row path
        mixed = [
            block(torch.cat([x[i : i + 1], x[i : i + 1]]), torch.cat([row, other]))[0]
            for i in range(3)
        ]
    assert torch.allclose(shared, torch.stack(mixed), atol=1e-5)
    # and the modulation matters, so the check above could fail
    with torch.no_grad():
        assert not torch.allclose(shared, block(x, other.expand(3, 12)), atol=1e-2)


def test_training_rows_with_different_times_keep_their_own_modulation():
    block = ResBlock(8, 8, time_dim=12)
    x, temb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    out = block(x, temb)
    alone = torch.cat([block(x[i : i + 1], temb[i : i + 1]) for i in range(2)])
    assert torch.allclose(out, alone, atol=1e-5)
    out.sum().backward()
    assert block.film.weight.grad is not None and block.film.weight.grad.abs().sum() > 0
