"""Mixture-of-experts layers as Linears, so that every expert can be calibrated and packed like any Linear.

transformers (5.x) keeps a block's experts fused in 3-D parameters: `gate_up_proj` [E, 2I, H] and `down_proj`
[E, H, I], with a forward that routes each token to its top-k experts. `unfuse_experts` replaces such a module by
`Experts`, a ModuleList of one `Expert` (gate_up_proj: Linear H -> 2I, down_proj: Linear I -> H) per expert with
the same forward, the same numbers, and the same routing; a hook on an expert's Linear then sees exactly the
tokens routed to that expert, which is what its Hessian must be built from. The router stays as it is (it is
not an nn.Linear in these models, so no recipe packs it). A checkpoint records which modules were unfused
(`quantization_config.unfused_experts`) and the loader unfuses the same modules of its skeleton first.

Layouts other than this one (transposed or interleaved gate/up, biases) are left fused and reported by
`fused_experts`, so a plan can say what stays dense.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class Expert(nn.Module):
    """One expert: down_proj(act(gate) * up) with [gate, up] = gate_up_proj(x)."""

    def __init__(self, hidden: int, intermediate: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)


class Experts(nn.ModuleList):
    """Drop-in for transformers' fused experts: forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])."""

    def __init__(self, experts: list[Expert], act_fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.act_fn = act_fn

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:  # type: ignore[override]
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            slot, token = torch.where(top_k_index.T.eq(e))  # which of their k, and the tokens routed to expert e
            if token.numel() == 0:
                continue
            gate, up = expert.gate_up_proj(hidden_states[token]).chunk(2, dim=-1)
            y = expert.down_proj(self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _canonical(m: nn.Module) -> tuple[int, int, int] | None:
    """(E, H, I) when `m` holds fused experts in transformers' canonical layout, else None."""
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and callable(getattr(m, "act_fn", None))):
        return None
    if gu.dim() != 3 or down.dim() != 3 or getattr(m, "has_bias", False):
        return None
    E, two_i, H = gu.shape
    if down.shape != (E, H, two_i // 2) or two_i % 2:
        return None
    return E, H, two_i // 2


def fused_experts(model: nn.Module) -> list[str]:
    """Modules that hold 3-D expert parameters (any layout): what stays dense unless `unfuse_experts` takes it."""
    return [n for n, m in model.named_modules()
            if any(p.dim() == 3 for p in m.parameters(recurse=False)) and not isinstance(m, Experts)]


def unfuse(m: nn.Module) -> Experts:
    """The Experts module holding `m`'s weights (copied; on the meta device only shapes are made)."""
    shape = _canonical(m)
    if shape is None:
        raise ValueError(f"{type(m).__name__} is not a fused experts module in the canonical layout")
    E, H, I = shape
    gu, down = m.gate_up_proj, m.down_proj
    experts = [Expert(H, I, device=gu.device, dtype=gu.dtype) for _ in range(E)]
    if gu.device.type != "meta":
        with torch.no_grad():
            for e, ex in enumerate(experts):
                ex.gate_up_proj.weight.copy_(gu[e])
                ex.down_proj.weight.copy_(down[e])
    return Experts(experts, m.act_fn)


def unfuse_experts(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace fused experts by `Experts` in place: the modules `names`, or every one in the canonical layout;
    returns the names replaced."""
    targets = names if names is not None else [n for n, m in model.named_modules() if _canonical(m) is not None]
    for name in targets:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, unfuse(model.get_submodule(name)))
    return list(targets)
