"""Bit allocation: decide each Linear's widths (the `Plan`) before rounding.

Every allocator is one module with a frozen `Config` and `allocate(ctx, cfg) -> Allocation`:
    uniform   every Linear gets the recipe's `weights` spec (after overrides)
    baq       BAQ (Zhang et al. 2025): GPTQ losses at a reference width -> closed-form widths per group of
              columns, per layer, or per column (faithful mode, level counts)
    evopress  EvoPress (Sieberling et al. 2025): evolutionary search over per-layer widths on a level database,
              fitness = KL(dense ‖ candidate) on fresh calibration tokens
    mix       llama.cpp's per-tensor ggml type mix of an ftype (Q4_K_M, ...), data-free: known when the plan is made
    ggml_baq  a ggml type per Linear under a bits-per-weight budget, from each type's measured GPTQ loss
"""

from __future__ import annotations

from types import ModuleType

from compress.allocate import baq, evopress, ggml_baq, mix, uniform

METHODS: dict[str, ModuleType] = {"uniform": uniform, "baq": baq, "evopress": evopress, "mix": mix,
                                  "ggml_baq": ggml_baq}
