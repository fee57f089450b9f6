"""A ggml type per Linear under a file-size budget: BAQ's idea (spend bits where the rounding loss falls most per
bit) on measured losses instead of a loss model, with costs counted as llama.cpp counts them.

Pass 1 rounds every Linear with GPTQ at *each* candidate type (the recipe's `choices`, each through llama.cpp's
shape fallback, so a 576-wide row has the 32-block types and a 1536-wide one the k-quants too) on the same
Hessian, and records the loss ½·tr(ΔW H ΔWᵀ) of each; the model propagates through the reference type. A layer
loss is in that Linear's output units and does not compare across Linears (BAQ's own caveat, budget.py), so each
is divided by the Linear's output energy ½·tr(W H Wᵀ): the relative error its output carries. The allocation then
minimises the sum of relative errors at Σ numel · bpw(type) ≤ target · Σ numel, by greedy upgrades along each
Linear's lower convex hull of (bits, error) (the exact optimum of the relaxed problem, within one step of the
discrete one). Pass 2 is the ordinary rounding stage with that plan.

target_bpw 0 means the same budget as llama.cpp's mix of `ftype` on this model (the same file size, so the two
compare at equal bytes); `ftype` also gives the token embedding and output their types and the file its label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from compress import ggml, mix
from compress.allocate import mix as rules
from compress.allocate.context import Allocation, Context
from compress.errors import CompressError
from compress.plan import LayerSpec, LayerWeight, Plan
from compress.recipe import ggml_spec
from compress.reports import LayerReport

CHOICES = ("q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0")


@dataclass(frozen=True)
class Config:
    needs_calibration: ClassVar[bool] = True  # a fact of the allocator, not a recipe knob
    ftype: str = "q4_k_m"  # llama.cpp's mix this allocation replaces (budget, embedding/output types, label)
    target_bpw: float = 0.0  # bits per weight of the allocated Linears as llama.cpp counts them; 0: ftype's
    choices: tuple[str, ...] = CHOICES
    reference: str = "q4_k"  # the type pass 1 propagates through (after the shape fallback)

    def __post_init__(self) -> None:
        mix.check_ftype(self.ftype)
        bad = [c for c in (*self.choices, self.reference) if c not in ggml.TYPES]
        if bad or not self.choices:
            raise CompressError(f"ggml_baq choices {bad or '[]'} are not ggml types; choose from "
                                f"{', '.join(ggml.TYPES)}")
        if self.target_bpw < 0:
            raise CompressError(f"ggml_baq target_bpw={self.target_bpw} must be positive (or 0: the ftype's size)")


def candidates(choices: tuple[str, ...], K: int) -> list[str]:
    """The distinct types a K-wide row can hold, by bits per weight."""
    out = {mix.fitted(c, K) for c in choices} - {"f16"}
    return sorted(out, key=lambda t: ggml.TYPES[t].bpw)


def allocate(ctx: Context, cfg: Config) -> Allocation:
    from compress.round import gptq

    if ctx.method != "gptq":
        raise CompressError("ggml_baq measures each type's GPTQ loss; use round.method=gptq")
    model = ctx.model
    K = {n: model.get_submodule(n).weight.shape[1] for n in ctx.base}
    numel = {n: model.get_submodule(n).weight.numel() for n in ctx.base}
    options = {n: candidates(cfg.choices, K[n]) for n in ctx.base}
    if any(not o for o in options.values()):
        raise CompressError(f"ggml_baq: no type of {list(cfg.choices)} fits some Linear's rows; add q8_0 or q4_0")
    rule_types = rules.types(model, ctx.base, cfg.ftype)
    total = sum(numel.values())
    target = cfg.target_bpw or sum(numel[n] * _bpw(rule_types[n]) for n in ctx.base) / total
    errors: dict[str, dict[str, float]] = {}

    def round_layer(name: str, lin: nn.Linear, H: Tensor | None, spec: LayerSpec) -> tuple[nn.Module, LayerReport]:
        from compress.nn import CompressedLinear

        assert H is not None
        W = lin.weight.detach().float()
        energy = float(0.5 * torch.einsum("nk,kj,nj->", W, H.float(), W))  # ½·tr(W H Wᵀ)
        ref = mix.fitted(cfg.reference, K[name])
        ref = ref if ref in options[name] else options[name][len(options[name]) // 2]
        kept = None
        errors[name] = {}
        for t in options[name]:
            out = gptq.apply(LayerWeight(W, ggml_spec(t)), H, ctx.recipe.round.config)
            errors[name][t] = float(out.loss.sum()) / max(energy, 1e-30)
            if t == ref:
                kept = out
        bias = None if lin.bias is None else lin.bias.detach()
        return CompressedLinear.from_weight(kept, bias), LayerReport(name, float(kept.loss.sum()), 0.0, {},
                                                                     kept.loss.detach().cpu(), numel[name])

    ctx.log(f"ggml_baq pass 1: GPTQ at each of {sorted({t for o in options.values() for t in o})} per Linear")
    ctx.measure(Plan({n: ggml_spec(options[n][0]) for n in ctx.base}), stage="ggml_baq pass 1",
                round_layer=round_layer)
    chosen = choose(errors, numel, target)
    plan = Plan({n: ggml_spec(t) for n, t in chosen.items()})
    got = sum(numel[n] * _bpw(t) for n, t in chosen.items()) / total
    counts: dict[str, int] = {}
    for t in chosen.values():
        counts[t] = counts.get(t, 0) + 1
    before = sum(errors[n].get(rule_types[n], math.nan) for n in ctx.base)
    after = sum(errors[n][t] for n, t in chosen.items())
    ctx.log(f"ggml_baq: {got:.4f} bits per weight (target {target:.4f}, llama.cpp's {cfg.ftype}); summed relative "
            f"error {after:.4g} vs {before:.4g} for {cfg.ftype}'s types")
    return Allocation(plan, summary={"method": "ggml_baq", "ftype": cfg.ftype, "target_bpw": target, "bpw": got,
                                     "types": counts, "relative_error": after, "rules_relative_error": before})


def _bpw(t: str) -> float:
    return 16.0 if t == "f16" else ggml.TYPES[t].bpw


def choose(errors: dict[str, dict[str, float]], numel: dict[str, int], target: float) -> dict[str, str]:
    """Types minimising Σ errors[n][t] at Σ numel[n]·bpw(t) ≤ target·Σ numel: start every Linear at its cheapest
    type, then take the upgrade (along its lower convex hull) that removes the most error per bit spent, while one
    fits."""
    hull = {n: _hull(e) for n, e in errors.items()}
    at = {n: 0 for n in errors}
    budget = target * sum(numel.values()) - sum(numel[n] * _bpw(h[0]) for n, h in hull.items())
    if budget < -1e-6:
        raise CompressError(f"ggml_baq: target {target:.3f} bits per weight is below the smallest types' size; "
                            "raise target_bpw or add smaller choices")
    while True:
        best, gain = None, -math.inf
        for n, h in hull.items():
            if at[n] + 1 < len(h):
                a, b = h[at[n]], h[at[n] + 1]
                cost = numel[n] * (_bpw(b) - _bpw(a))
                if cost <= budget + 1e-6:
                    g = (errors[n][a] - errors[n][b]) / cost
                    if g > gain:
                        best, gain = n, g
        if best is None:
            return {n: h[at[n]] for n, h in hull.items()}
        h = hull[best]
        budget -= numel[best] * (_bpw(h[at[best] + 1]) - _bpw(h[at[best]]))
        at[best] += 1


def _hull(err: dict[str, float]) -> list[str]:
    """Types on the lower convex hull of (bpw, error), cheapest first (a type that costs more and errs more, or sits
    above the chord of its neighbours, is never the best use of bits)."""
    pts = sorted(err, key=lambda t: (_bpw(t), err[t]))
    out: list[str] = []
    for t in pts:
        if out and err[t] >= err[out[-1]]:
            continue
        while len(out) >= 2:
            a, b = out[-2], out[-1]
            # b is above the chord a -> t: drop it
            if (err[b] - err[a]) * (_bpw(t) - _bpw(a)) >= (err[t] - err[a]) * (_bpw(b) - _bpw(a)):
                out.pop()
            else:
                break
        out.append(t)
    return out
