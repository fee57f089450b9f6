"""Rounding methods: each turns a dense `LayerWeight` into codes on its `LayerSpec`'s grid.

Every method is one module with a frozen `Config` dataclass (paper defaults, validated) and a pure
`apply(lw, H, cfg) -> LayerWeight`; `H` is the layer's input Hessian [K, K] (None when
`Config.needs_hessian` is False).
"""

from __future__ import annotations

from types import ModuleType

from compress.round import gptq, rtn

METHODS: dict[str, ModuleType] = {"rtn": rtn, "gptq": gptq}
