"""Spending a bit budget under the exponential loss model of BAQ.

A unit u (a group of columns, a layer, ...) with n_u weights and measured loss L_u at the reference
width R is modelled as

    L_u(b) = L_u · 2^(-θ (b - R)).

Minimising Σ L_u(b_u) subject to Σ n_u b_u = B̄ Σ n_u (relaxed to real b) sets every unit's loss *per
weight* equal (Lagrange: θ ln2 L_u(b_u) / n_u = μ), which gives the closed form

    b_u = B̄ + (1/θ) · log2( (L_u/n_u) / λ ),   log2 λ = Σ n_u log2(L_u/n_u) / Σ n_u,

i.e. λ is the n-weighted geometric mean of the losses per weight. For equal n_u this is BAQ's
R_j = R̄ + (1/θ) log2(L_j / geomean L). The predicted loss ratio against spending B̄ everywhere is
n-weighted-geomean / mean (≤ 1 by AM-GM).

`discrete` then maps b_u to a set of supported widths and repairs the budget greedily on the modelled
loss change per bit, so the realised Σ n_u b_u is as close to the target as the widths allow, never
above it (exactly equal whenever equal-size units make that possible).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from compress.plan import Plan

# Measured on SmolLM2-135M (evals/results/allocate.md, baq-evopress-3bit): why cross-Linear allocation on
# layer-local losses is a poor start.
CROSS_LINEAR_CAVEAT = ("compares raw layer losses across Linears, whose units differ (each is in its own "
                       "output's units); on SmolLM2 such a start had 0.42x uniform's summed layer loss but "
                       "2.5x its KL.")


def closed_form(loss: Tensor, numel: Tensor, target: float, theta: float) -> Tensor:
    """Real-valued widths b_u [U] minimising Σ L_u 2^(-θ(b_u-R)) at Σ n_u b_u = target Σ n_u."""
    per_weight = torch.log2(loss.double().clamp_min(1e-30) / numel.double())
    log_lambda = (numel.double() * per_weight).sum() / numel.double().sum()
    return target + (per_weight - log_lambda) / theta


def modelled_loss(loss: Tensor, bits: Tensor, ref_bits: float, theta: float) -> Tensor:
    return loss.double() * torch.exp2(-theta * (bits.double() - ref_bits))


def predicted_gain(loss: Tensor, numel: Tensor) -> float:
    """Loss of the optimal real allocation / loss of the uniform one: weighted geomean / mean of L/n."""
    per_weight = loss.double().clamp_min(1e-30) / numel.double()
    w = numel.double() / numel.double().sum()
    geo = torch.exp((w * per_weight.log()).sum())
    return float(geo / (w * per_weight).sum())


def discrete(loss: Tensor, numel: Tensor, target: float, theta: float, ref_bits: float,
             choices: Sequence[int]) -> Tensor:
    """Integer widths from `choices` [U] with Σ n_u b_u ≤ target Σ n_u, as close to it as the widths allow.

    Start from the closed form rounded to the nearest choice, then (1) while over budget, step down the
    unit whose modelled loss grows least per bit saved; (2) while a step up still fits, step up the unit
    whose modelled loss drops most per bit spent. The model is convex in b, so each greedy step is the
    best marginal trade.
    """
    choices = sorted(set(choices))
    if target < choices[0] or target > choices[-1]:
        raise ValueError(f"target {target} bits is outside the widths {choices}")
    c = torch.tensor(choices, dtype=torch.float64)
    real = closed_form(loss, numel, target, theta).clamp(choices[0], choices[-1])
    idx = (real.unsqueeze(1) - c).abs().argmin(dim=1)  # [U] index into choices
    n = numel.double()
    budget = target * float(n.sum())

    def cost_of(i: Tensor) -> float:
        return float((n * c[i]).sum())

    def rate(i: Tensor, j: Tensor) -> Tensor:
        """Modelled loss saved per bit spent when every unit moves from choice i to choice j (j > i)."""
        saved = modelled_loss(loss, c[i], ref_bits, theta) - modelled_loss(loss, c[j], ref_bits, theta)
        return saved / ((c[j] - c[i]) * n)

    while cost_of(idx) > budget + 1e-9:  # (1) over budget: step down where a bit saves least loss
        lower = (idx - 1).clamp(min=0)
        harm = rate(lower, idx).where(idx > 0, torch.full((len(idx),), math.inf, dtype=torch.float64))
        idx[int(torch.argmin(harm))] -= 1
    return fill(loss, numel, c[idx].to(torch.int64), target, theta, ref_bits, choices)


def fill(loss: Tensor, numel: Tensor, bits: Tensor, target: float, theta: float, ref_bits: float,
         choices: Sequence[int]) -> Tensor:
    """Spend what `bits` [U] (widths from `choices`, Σ n_u b_u ≤ target Σ n_u) leaves of the budget: step up
    the unit whose modelled loss drops most per bit spent, while some step still fits."""
    choices = sorted(set(choices))
    c = torch.tensor(choices, dtype=torch.float64)
    idx = torch.searchsorted(c, bits.double())
    n = numel.double()
    budget = target * float(n.sum())
    last = len(choices) - 1
    while True:
        left = budget - float((n * c[idx]).sum())
        upper = (idx + 1).clamp(max=last)
        fits = (idx < last) & ((c[upper] - c[idx]) * n <= left + 1e-9)
        if not bool(fits.any()):
            break
        saved = modelled_loss(loss, c[idx], ref_bits, theta) - modelled_loss(loss, c[upper], ref_bits, theta)
        gain = (saved / ((c[upper] - c[idx]) * n)).where(fits, torch.full((len(idx),), -math.inf, dtype=torch.float64))
        idx[int(torch.argmax(gain))] += 1
    return c[idx].to(torch.int64)


# --- units: what one width is given to ---------------------------------------------------------------------

TIED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


@dataclass(frozen=True)
class Unit:
    layers: tuple[str, ...]
    numel: int


def make_units(plan: Plan, numel: Mapping[str, int], blocks: str, tie: bool, exclude: set[str]) -> list[Unit]:
    """One unit per Linear, or per fused set (q/k/v, gate/up) when tie is on; `numel`: weights of each Linear."""
    names = [n for n in plan if n not in exclude]
    units, taken = [], set()
    for n in names:
        if n in taken:
            continue
        members = (n,)
        if tie:
            block, rel = n[len(blocks) + 1 :].split(".", 1)
            for fused in TIED:
                if rel in fused:
                    members = tuple(f"{blocks}.{block}.{r}" for r in fused if f"{blocks}.{block}.{r}" in names)
        taken.update(members)
        units.append(Unit(members, sum(numel[m] for m in members)))
    return units
