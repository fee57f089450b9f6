"""Min-max grids: codes in range, error bounded by half a step, stored scales are exact."""

from __future__ import annotations

import pytest
import torch

from compress import grid


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group", [32, 128, 100])
def test_round_to_nearest_error_is_within_a_step(bits: int, sym: bool, group: int) -> None:
    W = torch.randn(16, 300, generator=torch.Generator().manual_seed(bits))
    scale, zero = grid.choose_qparams_groups(W, bits, group, sym, torch.float16)
    assert scale.shape == zero.shape == (16, grid.n_groups(300, group))
    assert torch.equal(scale, scale.half().float()), "scales must be exactly representable in their storage dtype"
    codes = grid.quantize_groups(W, scale, zero, bits, group)
    assert int(codes.max()) <= 2**bits - 1
    err = (grid.dequantize_groups(codes, scale, zero, group) - W).abs()
    step = grid.expand(scale, group, 300)
    # inside the range the error is at most half a step; the rounded zero point (asymmetric) or GPTQ's
    # off-centre symmetric grid can leave the extreme value of a group one step short
    assert bool((err <= step + 1e-6).all())
    assert float((err / step).mean()) < 0.3


def test_symmetric_zero_is_the_midpoint() -> None:
    _, zero = grid.choose_qparams(torch.randn(4, 10), 3, True, torch.float32)
    assert torch.equal(zero, torch.full((4,), 4.0))


def test_range_always_contains_zero_and_zero_is_exact() -> None:
    W = torch.rand(3, 64) + 1.0  # all positive: range is [0, max]
    scale, zero = grid.choose_qparams_groups(W, 4, 64, False, torch.float32)
    assert torch.equal(zero, torch.zeros_like(zero))
    W[:, :8] = 0
    codes = grid.quantize_groups(W, scale, zero, 4, 64)
    assert torch.equal(grid.dequantize_groups(codes, scale, zero, 64)[:, :8], torch.zeros(3, 8))


def test_all_zero_group_gets_a_usable_grid() -> None:
    scale, zero = grid.choose_qparams(torch.zeros(2, 16), 4, False, torch.float16)
    assert bool((scale > 0).all())
    assert torch.equal(grid.dequantize(grid.quantize(torch.zeros(2, 16), scale[:, None], zero[:, None], 15),
                                       scale[:, None], zero[:, None]), torch.zeros(2, 16))


def test_narrow_last_group_is_fitted_on_its_own_columns() -> None:
    W = torch.randn(2, 576)
    W[:, 512:] *= 0.01  # the last (64-wide) group is much smaller: it must get its own, finer grid
    scale, _ = grid.choose_qparams_groups(W, 4, 128, False, torch.float32)
    assert scale.shape == (2, 5)
    assert bool((scale[:, 4] < scale[:, 3] / 10).all())
