"""BAQ (compress/allocate/baq.py): plans hit their bit targets, faithful per-column levels, and mixed-precision
checkpoints end to end. Its closed form and budget repair are tests/allocate/test_budget.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import logits, run, tiny_llama

import compress
from compress import checkpoint
from compress.nn import CompressedLinear


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


def test_tied_baq_gives_every_fused_set_one_width_and_keeps_the_budget() -> None:
    m = uneven_llama()
    res = run(m, "gptq-3bit", ("allocate={method: baq, target_bits: 3, granularity: layer, tie: true}",
                               "calibrate.samples=16"))
    for block in range(2):
        for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            part = "self_attn" if fused[0] == "q_proj" else "mlp"
            widths = {res.plan[f"model.layers.{block}.{part}.{f}"].bits for f in fused}
            assert len(widths) == 1, (block, fused, widths)
    code, _ = res.avg_bits()
    assert code <= 3.0 + 1e-12 and res.allocation["tie"] is True
    widths = {s.bits for s in res.plan.layers.values()}
    assert len(widths) > 1, "tied BAQ still mixes widths across sets"
