"""BAQ: Bit Allocation Quantization (Zhang, Wang, Lasaulce, Debbah 2025; CSU-ModelCompression/BAQ).

Pass 1 rounds every Linear at a reference width R with the recipe's rounding method (GPTQ) through the
sequential driver and records each column's loss L_j = ½ Σ_rows (w - q)² / U_jj²; the model is left
unchanged. BAQ's loss model L(b) = L(R)·2^(-θ(b-R)) then gives every unit its width in closed form
(`budget.py`): units with larger losses get more bits, and at the optimum all units contribute the same
loss per weight. Pass 2 is the ordinary rounding stage with the resulting mixed plan.

Granularity (kernel-friendly modes; both land on integer widths from `choices` with an exact budget):
    group   units = the grid's groups of columns; each Linear spends its own budget (BAQ's within-layer
            allocation: layer losses are in each Linear's output units and do not compare across Linears),
            then what its groups could not take (SmolLM2: K = 576 is 4.5 groups of 128, so 2.5 bits per
            Linear is out of reach) is spent across Linears on the loss relative to each group's Linear,
            so the model's average is exact to one group; widths differ along K (format v2 parts)
    layer   units = whole Linears; one budget over the model, numel-weighted; with `tie` the sets a server
            fuses (q/k/v, gate/up) are one unit, summing their losses, and share a width (vLLM refuses
            fused shards of different widths)
and the faithful mode of the reference code:
    column  per-row grids (group_size -1); column j gets M_j = round(max(1, 2^R·(L_j / geomean L)^(1/θ)))
            levels (any count, not just powers of two; capped at 256), M_j = 1 zeroes the column; the
            budget holds only on average before rounding, so the realised rate (mean log2 M_j) is reported.
            Stored with ceil(log2 M_j) bits per column (see format.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from compress.allocate import budget
from compress.allocate.context import Allocation, Context
from compress.errors import CompressError
from compress.plan import Plan
from compress.reports import LayerReport

GRANULARITIES = ("group", "layer", "column")


@dataclass(frozen=True)
class Config:
    target_bits: float = 3.0  # average code bits over the allocated Linears, by element count
    granularity: str = "group"  # group | layer
    choices: tuple[int, ...] = (2, 3, 4, 8)  # widths a unit may get
    theta: float = 1.95  # slope of log2-loss per bit; the reference's fitted value (2 = the 6 dB/bit rule)
    reference_bits: int = 0  # width of pass 1; 0 = the target rounded half up
    tie: bool = False  # granularity=layer: q/k/v and gate/up share a width (what vLLM-style servers fuse)
    needs_calibration: ClassVar[bool] = True  # a fact of the allocator, not a recipe knob

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise CompressError(f"baq granularity={self.granularity!r} is invalid; choose one of {GRANULARITIES}")
        if not self.choices or not all(1 <= b <= 8 for b in self.choices):
            raise CompressError(f"baq choices={list(self.choices)} must be widths from 1 to 8")
        if not min(self.choices) <= self.target_bits <= max(self.choices):
            raise CompressError(f"baq target_bits={self.target_bits} must lie between the smallest and largest "
                                f"of choices={list(self.choices)}")
        if self.theta <= 0:
            raise CompressError(f"baq theta={self.theta} must be positive (1.95 in the paper)")
        if not 0 <= self.reference_bits <= 8:
            raise CompressError(f"recipe value allocate.reference_bits={self.reference_bits} is out of range; use 0 "
                                "(the target rounded) or a width from 1 to 8")
        if self.tie and self.granularity != "layer":
            raise CompressError(f"baq tie=true gives fused Linears one width, which needs granularity=layer "
                                f"(got {self.granularity}); set allocate.granularity=layer or drop tie")

    @property
    def ref_bits(self) -> int:
        return self.reference_bits or math.floor(self.target_bits + 0.5)


def first_pass(ctx: Context, ref_bits: int, kept: dict[str, nn.Module] | None = None) -> dict[str, LayerReport]:
    """Round every planned Linear at ref_bits with the recipe's method, record losses, leave the model dense
    (the rounded Linears go to `kept`, if given)."""
    plan = Plan({n: replace(s, bits=ref_bits) for n, s in ctx.base.layers.items()})
    reports = ctx.measure(plan, stage=f"baq pass 1 ({ref_bits} bits)", kept=kept)
    return {r.name: r for b in reports for r in b.layers}


def column_levels(L: torch.Tensor, ref_bits: int, theta: float) -> torch.Tensor:
    """The reference's level counts: M_j = round(max(1, 2^R (L_j / geomean L)^(1/θ))), capped at 256."""
    geo = torch.exp(torch.log(L.double() + 1e-8).mean())
    t = (2.0**ref_bits) * (L.double() / geo).pow(1 / theta)
    return torch.round(t.clamp_min(1)).clamp(max=256).to(torch.int64)


def allocate(ctx: Context, cfg: Config) -> Allocation:
    if not ctx.needs_hessian:
        raise CompressError("baq allocates from the rounding method's per-column losses; use round.method=gptq")
    ctx.log(f"BAQ pass 1: {ctx.method} at {cfg.ref_bits} bits to measure column losses")
    uniform: dict[str, nn.Module] = {}
    losses = first_pass(ctx, cfg.ref_bits, uniform)
    names = [n for n in ctx.base if n not in ctx.pinned]
    layers = dict(ctx.base.layers)
    summary: dict[str, object] = {"method": "baq", "granularity": cfg.granularity, "theta": cfg.theta,
                                  "reference_bits": cfg.ref_bits, "target_bits": cfg.target_bits}
    before = after = 0.0  # modelled total loss: uniform target vs allocation
    if cfg.granularity == "column":
        if any(ctx.base[n].group_size != -1 for n in names):
            raise CompressError("baq granularity=column (the faithful mode) uses per-row grids; "
                                "set weights.group_size=-1")
        rate_num = rate_den = 0.0
        gains = []
        for name in names:
            rep, K = losses[name], losses[name].col_loss.numel()
            L = rep.col_loss.double()
            levels = column_levels(L, cfg.ref_bits, cfg.theta)
            layers[name] = replace(layers[name], bits=cfg.ref_bits, levels=tuple(levels.tolist()))
            rate_num += float(levels.double().log2().sum()) * (rep.numel // K)
            rate_den += rep.numel
            gains.append(float(torch.exp(torch.log(L + 1e-8).mean()) / L.mean()))
        summary["realised_rate"] = rate_num / rate_den
        summary["predicted_loss_ratio"] = sum(gains) / len(gains)  # the reference's per-layer "gain", averaged
        summary["layer_gains"] = dict(zip(names, gains, strict=True))  # geomean(L) / mean(L) of each Linear
        summary["pass1_loss"] = sum(losses[n].loss for n in names)
        ctx.log(f"BAQ (columns): realised rate {summary['realised_rate']:.4f} bits, mean predicted gain "
                f"{summary['predicted_loss_ratio']:.3f}")
        return Allocation(Plan(layers), summary=summary, reference=uniform)
    if cfg.granularity == "layer":
        ctx.log(f"BAQ granularity=layer {budget.CROSS_LINEAR_CAVEAT} Prefer granularity=group.")
        numel = {m: losses[m].numel for m in names}
        units = budget.make_units(ctx.base, numel, ctx.arch.blocks, cfg.tie, set(ctx.pinned))
        L = torch.tensor([sum(losses[m].loss for m in u.layers) for u in units], dtype=torch.float64)
        n = torch.tensor([u.numel for u in units], dtype=torch.float64)
        bits = budget.discrete(L, n, cfg.target_bits, cfg.theta, cfg.ref_bits, cfg.choices)
        for u, b in zip(units, bits.tolist(), strict=True):
            for name in u.layers:
                layers[name] = replace(layers[name], bits=int(b))
        summary["tie"] = cfg.tie
        before = float(budget.modelled_loss(L, torch.full_like(L, cfg.target_bits), cfg.ref_bits, cfg.theta).sum())
        after = float(budget.modelled_loss(L, bits, cfg.ref_bits, cfg.theta).sum())
    else:  # BAQ within each Linear, then the remainder its groups could not take spent across Linears
        Ls, ns, per = [], [], []
        for name in names:
            rep = losses[name]
            K = rep.col_loss.numel()
            gw = layers[name].group_width(K)
            Ls.append(torch.stack([g.sum() for g in rep.col_loss.double().split(gw)]))  # [G] loss per group
            ns.append(torch.tensor([len(g) for g in torch.arange(K).split(gw)], dtype=torch.float64)
                      * (rep.numel // K))  # elements per group (a narrower last group counts less)
            per.append(budget.discrete(Ls[-1], ns[-1], cfg.target_bits, cfg.theta, cfg.ref_bits, cfg.choices))
        # Layer losses are in each Linear's own output units and do not compare across Linears (one global
        # greedy on them starved small-loss Linears: ppl 46.9 vs 22.1 at 3 bits on SmolLM2), so the leftover
        # is spent on the loss relative to the group's own Linear.
        rel = torch.cat([L / L.sum().clamp_min(1e-30) for L in Ls])
        n = torch.cat(ns)
        bits = budget.fill(rel, n, torch.cat(per), cfg.target_bits, cfg.theta, cfg.ref_bits, cfg.choices)
        for name, b in zip(names, bits.split([len(L) for L in Ls]), strict=True):
            layers[name] = replace(layers[name], bits=tuple(int(x) for x in b))
        L = torch.cat(Ls)
        before = float(budget.modelled_loss(L, torch.full_like(L, cfg.target_bits), cfg.ref_bits, cfg.theta).sum())
        after = float(budget.modelled_loss(L, bits, cfg.ref_bits, cfg.theta).sum())
    summary["pass1_loss"] = sum(losses[n].loss for n in names)
    summary["predicted_loss_ratio"] = after / before if before else float("nan")
    ctx.log(f"BAQ: modelled layer-loss ratio vs uniform {cfg.target_bits:g} bits: "
            f"{summary['predicted_loss_ratio']:.3f}")
    return Allocation(Plan(layers), summary=summary, reference=uniform)
