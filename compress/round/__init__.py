"""Rounding methods: each turns a dense `LayerWeight` into codes on its `LayerSpec`'s grid.

Every method is one module with a frozen `Config` dataclass (paper defaults, validated) and a pure
`apply(lw, H, cfg) -> LayerWeight`; `H` is the layer's input Hessian [K, K] (None when
`Config.needs_hessian` is False). A method that rounds the whole model jointly (DiscQuant) also has
`round_model(model, plan, ids, cfg, ...) -> {name: LayerWeight}`, and the pipeline calls that instead.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from compress.round import discquant, gptq, pbllm, rtn

METHODS: dict[str, ModuleType] = {"rtn": rtn, "gptq": gptq, "discquant": discquant, "pbllm": pbllm}


def joint(method: str) -> bool:
    """Whether `method` rounds the whole model at once (no per-layer `apply`)."""
    return hasattr(METHODS[method], "round_model")


def layerwise(method: str, cfg: Any) -> tuple[ModuleType, Any]:
    """The per-layer method an allocator measures with: the recipe's own, or GPTQ (with act-order) when the
    recipe's method rounds jointly, so a BAQ/EvoPress allocation can feed DiscQuant."""
    if joint(method):
        return gptq, gptq.Config(act_order=True)
    return METHODS[method], cfg
