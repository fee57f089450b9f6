"""llama.cpp's type mixes (Q4_K_M, Q3_K_M, Q2_K, ...): each Linear gets the ggml type that `llama-quantize`
would give it under the ftype (compress/mix.py has the rules), so a gguf-* recipe's file matches llama.cpp's
tensor for tensor in type and size, and only the rounding differs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from compress import mix
from compress.allocate.context import Allocation, Context
from compress.plan import Plan
from compress.recipe import ggml_spec


@dataclass(frozen=True)
class Config:
    needs_calibration: ClassVar[bool] = False  # a fact of the allocator, not a recipe knob
    ftype: str = "q4_k_m"

    def __post_init__(self) -> None:
        mix.check_ftype(self.ftype)


def types(model: nn.Module, names: Iterable[str], ftype: str) -> dict[str, str]:
    """Each named Linear's ggml type under `ftype` ("f16": llama.cpp keeps it unquantized)."""
    cfg = model.config
    arch = mix.gguf_arch(cfg.model_type)
    n_layer = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    shape = mix.Shape(n_layer, heads // (getattr(cfg, "num_key_value_heads", None) or heads))
    out = {}
    for name in names:
        gname = mix.gguf_name(f"{name}.weight", arch, n_layer) or ""
        i = int(gname.split(".")[1]) if gname.startswith("blk.") else 0
        K = model.get_submodule(name).weight.shape[1]
        cat = mix.category(gname)
        out[name] = (mix.output_type(ftype, K) if cat == "output"  # (a rounded head: weights.lm_head)
                     else mix.fitted(mix.layer_type(ftype, cat, i, shape), K))
    return out


def refine(model: nn.Module, base: Plan, cfg: Config) -> Plan:
    """The plan, known before any calibration (the rules read names and shapes only): each Linear of `base` at
    its type under the ftype; one that llama.cpp would keep in f16 stays dense."""
    return Plan({n: ggml_spec(t) for n, t in types(model, base, cfg.ftype).items() if t != "f16"})


def allocate(ctx: Context, cfg: Config) -> Allocation:
    counts: dict[str, int] = {}
    for spec in ctx.base.layers.values():  # (ctx.base is already `refine`d: pipeline.make_plan)
        counts[spec.ggml] = counts.get(spec.ggml, 0) + 1
    return Allocation(ctx.base, summary={"method": "mix", "ftype": cfg.ftype, "types": counts})
