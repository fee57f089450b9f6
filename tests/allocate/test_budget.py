"""The bit budget under BAQ's exponential loss model (compress/allocate/budget.py): the closed form solves the
relaxed problem, and the discrete repair hits the target exactly (equal units) or never overspends."""

from __future__ import annotations

import pytest
import torch

from compress.allocate import budget


def random_losses(U: int, seed: int) -> torch.Tensor:
    return torch.exp(2 * torch.randn(U, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


@pytest.mark.parametrize("seed", range(3))
def test_closed_form_equals_a_numerical_solution_of_the_relaxed_problem(seed: int) -> None:
    L = random_losses(40, seed)
    n = torch.randint(1, 6, (40,), generator=torch.Generator().manual_seed(seed + 10)).double() * 64
    target, theta, ref = 3.0, 1.95, 3.0
    # minimise Σ L 2^(-θ(b-ref)) over b with Σ n b = target Σ n, parametrised so the constraint always holds
    v = torch.zeros(40, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def bits() -> torch.Tensor:
        return target + v - (n * v).sum() / n.sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        f = budget.modelled_loss(L, bits(), ref, theta).sum()
        f.backward()
        return f

    opt.step(closure)
    exact = budget.closed_form(L, n, target, theta)
    torch.testing.assert_close(bits().detach(), exact, atol=1e-5, rtol=0)
    assert float((n * exact).sum() / n.sum()) == pytest.approx(target, abs=1e-12)
    assert budget.predicted_gain(L, n) < 1.0


@pytest.mark.parametrize("target", [2.5, 3.0, 3.25, 4.0])
@pytest.mark.parametrize("seed", range(5))
def test_budget_repair_hits_the_target_exactly_for_equal_units(target: float, seed: int) -> None:
    L, n = random_losses(64, seed), torch.full((64,), 128.0, dtype=torch.float64)
    b = budget.discrete(L, n, target, 1.95, 3, (2, 3, 4, 8))
    assert set(b.tolist()) <= {2, 3, 4, 8}
    assert float((n * b).sum() / n.sum()) == pytest.approx(target, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_budget_repair_never_overspends_with_unequal_units(seed: int) -> None:
    L = random_losses(30, seed)
    n = torch.randint(1, 9, (30,), generator=torch.Generator().manual_seed(seed)).double() * 100
    b = budget.discrete(L, n, 2.7, 1.95, 3, (2, 3, 4))
    avg = float((n * b).sum() / n.sum())
    assert 2.7 - 3 * 800 / float(n.sum()) <= avg <= 2.7 + 1e-12  # within one step of the smallest unit


def test_more_loss_gets_more_bits() -> None:
    L = torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=torch.float64)
    b = budget.discrete(L, torch.ones(4, dtype=torch.float64), 3.0, 2.0, 3, (2, 3, 4))
    assert b.tolist() == sorted(b.tolist()) and b[0] < b[-1]
