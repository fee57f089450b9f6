"""Pruning: masks hit their counts and patterns, Wanda weighs by input norms, ISS-P shrinks softly during
its pruning phase and ends exactly sparse, with pruned weights staying zero."""

from __future__ import annotations

import pytest
import torch
from helpers import WINDOWS, tiny_llama

from compress import distill, prune, teacher
from compress.errors import CompressError


def test_masks_hit_their_counts_and_patterns() -> None:
    W = torch.randn(8, 64)
    per_row = prune.mask_from_scores(W.abs(), 0.25, per_row=True)
    assert (per_row.sum(1) == 48).all()
    layer = prune.magnitude(W, 0.25)
    assert int(layer.sum()) == 8 * 64 - 128 and W.abs()[~layer].max() <= W.abs()[layer].min()
    two_four = prune.magnitude(W, 0.5, "2:4")
    assert (two_four.view(8, 16, 4).sum(-1) == 2).all()
    with pytest.raises(CompressError, match="not a multiple of 3"):
        prune.magnitude(W, 0.5, "1:3")


def test_wanda_keeps_weights_on_loud_inputs() -> None:
    W = torch.ones(4, 8)
    norm = torch.tensor([1, 1, 1, 1, 1, 1, 1, 100.0])
    keep = prune.wanda(W * torch.linspace(1, 2, 8), norm, 0.5)
    assert keep[:, 7].all() and (keep.sum(1) == 4).all()


def test_soft_shrink_multiplies_the_lowest_fraction_by_alpha() -> None:
    W = torch.arange(1, 11, dtype=torch.float32).view(1, 10)
    pruned = prune.soft_shrink_(W, 0.3, 0.5)
    assert pruned.sum() == 3 and torch.equal(W[0, :4], torch.tensor([0.5, 1.0, 1.5, 4.0]))


@pytest.mark.parametrize(("alpha", "prune_steps"), [(0.9, 5), (0.0, 5), (0.999, 0)])  # ISS-P, IHT, magnitude
def test_iss_p_ends_exactly_sparse_and_pruned_weights_stay_zero(alpha: float, prune_steps: int) -> None:
    teach = teacher.teacher(tiny_llama(), WINDOWS, 0, 4, torch.device("cpu"))
    m = tiny_llama()
    cfg = distill.Config(steps=10, windows_per_step=4, lr=1e-3, warmup=2, train="weights", sparsity=0.5,
                         iss_alpha=alpha, prune_steps=prune_steps)
    seen = {}

    def watch(p: distill.Progress) -> None:
        lin = m.model.layers[0].mlp.up_proj.weight
        seen[p.step] = float((lin == 0).float().mean())

    distill.distill(m, teach, WINDOWS, cfg, on_step=watch)
    if alpha and prune_steps:
        assert seen[3] < 0.5  # during the pruning phase weights are shrunk, not zeroed
    for lin in distill.block_linears(m):
        n = lin.weight.numel()
        assert int((lin.weight == 0).sum()) == n // 2
    # frozen mask: exactly half, every step after (prune_steps 0: from the first step on, magnitude + training)
    assert all(seen[s] == 0.5 for s in range(max(prune_steps, 1), 11))


def test_input_norms_equal_a_direct_computation() -> None:
    m = tiny_llama()
    lin = m.model.layers[1].mlp.down_proj
    seen = []
    h = lin.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].reshape(-1, inp[0].shape[-1])))
    norms = prune.input_norms(m, {"down": lin}, WINDOWS, batch_size=3)
    h.remove()
    torch.testing.assert_close(norms["down"], torch.cat(seen).norm(dim=0), rtol=1e-5, atol=1e-6)
