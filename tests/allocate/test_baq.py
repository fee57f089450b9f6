"""Bit allocation: BAQ's closed form and budget repair, and mixed-precision checkpoints end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import logits, run, tiny_llama

import compress
from compress import checkpoint
from compress.allocate import budget
from compress.nn import CompressedLinear


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


def uneven_llama() -> torch.nn.Module:
    """A tiny llama whose first group of columns and first block matter more (larger weights)."""
    m = tiny_llama()
    with torch.no_grad():
        for name, mod in m.model.layers.named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight[:, :32] *= 6.0 if name.startswith("0.") else 3.0
    return m


@pytest.mark.parametrize("granularity", ["group", "layer"])
def test_baq_plans_hit_the_target_and_reload_exactly(granularity: str, tmp_path: Path) -> None:
    m = uneven_llama()
    res = run(m, "gptq-3bit", (f"allocate={{method: baq, target_bits: 3, granularity: {granularity}}}",
                               "calibrate.samples=16"))
    code, _ = res.avg_bits()
    assert code == pytest.approx(3.0, abs=1e-12)
    widths = {b for s in res.plan.layers.values() for b in ((s.bits,) if isinstance(s.bits, int) else s.bits)}
    assert len(widths) > 1, "BAQ should mix widths on a model with unequal sensitivities"
    assert res.allocation["predicted_loss_ratio"] < 1.0
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path, card="card")
    loaded = compress.load(tmp_path)
    assert torch.equal(logits(loaded), logits(m))
    specs = {n: mod.spec for n, mod in loaded.named_modules() if isinstance(mod, CompressedLinear)}
    assert specs == res.plan.layers


def test_pinned_layers_keep_their_bits_and_leave_the_budget() -> None:
    res = run(tiny_llama(), "gptq-3bit", ("allocate={method: baq, target_bits: 3, granularity: layer}",
                                          "overrides=[{match: '*.down_proj', bits: 8}]"))
    assert all(res.plan[n].bits == 8 for n in res.plan if n.endswith("down_proj"))
    free = [n for n in res.plan if not n.endswith("down_proj")]
    numel = {n: res.shapes[n][0] * res.shapes[n][1] for n in free}
    avg = sum(res.plan[n].bits * numel[n] for n in free) / sum(numel.values())
    assert avg == pytest.approx(3.0, abs=1e-12)


def test_faithful_baq_levels_follow_the_reference_formula() -> None:
    from compress.allocate.baq import column_levels

    L = torch.tensor([0.0, 1.0, 4.0, 16.0, 64.0], dtype=torch.float64)
    m = column_levels(L, 3, 2.0)
    geo = torch.exp(torch.log(L + 1e-8).mean())
    expected = torch.round((8 * (L / geo).sqrt()).clamp_min(1)).clamp(max=256)
    assert m.tolist() == expected.long().tolist()
    assert m[0] == 1  # a column without loss gets one level: it is zeroed


def test_faithful_baq_checkpoint_stores_per_column_levels_and_reloads(tmp_path: Path) -> None:
    m = uneven_llama()
    res = run(m, "baq-3bit-faithful", ("calibrate.samples=16", "weights.group_size=-1"))
    spec = res.plan["model.layers.0.self_attn.q_proj"]
    assert spec.levels is not None and len(set(spec.levels)) > 1
    assert 2.5 < res.allocation["realised_rate"] < 3.5
    gains = res.allocation["layer_gains"]  # geomean / mean of each Linear's column losses: in (0, 1]
    assert set(gains) == set(res.plan.layers) and all(0 < g <= 1 for g in gains.values())
    assert res.allocation["predicted_loss_ratio"] == pytest.approx(sum(gains.values()) / len(gains))
    from compress import card

    assert any(f"| {min(gains.values()):.3f} |" in line for line in card.allocation_section(res))  # in the card
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path, card="card")
    loaded = compress.load(tmp_path)
    assert torch.equal(logits(loaded), logits(m))
    q = loaded.model.layers[0].self_attn.q_proj
    zeroed = [j for j, lv in enumerate(spec.levels) if lv == 1]
    if zeroed:
        assert torch.equal(q.dequantize()[:, zeroed], torch.zeros(q.out_features, len(zeroed)))


def test_group_budget_is_exact_over_the_model_even_when_no_single_linear_can_hit_it() -> None:
    m = uneven_llama()  # K = 64 with groups of 40 (40 + 24): no widths in {2, 3, 4} average 2.5 on it alone
    res = run(m, "gptq-3bit", ("allocate={method: baq, target_bits: 2.5, granularity: group, choices: [2, 3, 4]}",
                               "weights.group_size=40", "calibrate.samples=16"))
    numel = {n: res.shapes[n][0] * res.shapes[n][1] for n in res.plan}
    code = sum(float(res.plan[n].column_bits(res.shapes[n][1]).double().mean()) * numel[n] for n in numel)
    assert code / sum(numel.values()) == pytest.approx(2.5, abs=1e-2)  # within the smallest group (768 bits)
    # and no Linear is starved for another whose layer loss is larger in its own units: each spends its own
    # budget as far as its groups allow (40·2 + 24·3 = 152 of 160 bits per row here, 2.375), then the rest
    per_linear = [float(res.plan[n].column_bits(res.shapes[n][1]).double().mean()) for n in numel]
    assert min(per_linear) >= 2.375 - 1e-9 and max(per_linear) <= 2.5 + 40 / 64
