"""What an allocator gets to work with, and what it hands back to the pipeline.

Allocators never drive the calibration pass themselves: the pipeline hands them `measure`, which rounds
every Linear of a plan block by block on the calibration windows (with the recipe's per-layer method, or a
`round_layer` of the allocator's own) and leaves the model dense, and `round`, the per-layer method bound to
its config, for allocators that round one Linear at several widths (EvoPress's level database).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from compress.plan import LayerWeight, Plan
from compress.reports import BlockReport, Progress, RoundLayer

if TYPE_CHECKING:
    from compress.models import Arch
    from compress.recipe import Recipe


class Measure(Protocol):
    def __call__(self, plan: Plan, *, stage: str, round_layer: RoundLayer | None = None,
                 kept: dict[str, nn.Module] | None = None) -> list[BlockReport]:
        """One calibration pass rounding every Linear of `plan` (default: the per-layer method at the plan's
        spec), each block's dense Linears put back once it has produced the next block's inputs; `kept`
        receives the rounded modules (on the CPU)."""
        ...


@dataclass
class Context:
    """The model (dense, in place), its block layout, the uniform plan from the recipe, calibration windows."""

    model: nn.Module
    arch: Arch
    base: Plan  # the recipe's weights spec after overrides, one entry per Linear to compress
    pinned: set[str]  # Linears whose bits an override fixed: allocators keep them and leave them out of the budget
    windows: Tensor | None
    recipe: Recipe
    measure: Measure
    round: Callable[[LayerWeight, Tensor | None], LayerWeight]  # the per-layer method with its config
    method: str  # its name (the recipe's, or gptq when the recipe rounds jointly)
    needs_hessian: bool  # whether `round` looks at the Hessian (BAQ needs its per-column losses)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workdir: Path | None = None  # where resumable state lives (level database, search state)
    progress: Progress | None = None  # receives the BlockReports of the allocator's passes
    log: Callable[[str], None] = logging.getLogger("compress.allocate").info


@dataclass
class Allocation:
    """The plan, optionally with every Linear already rounded (EvoPress assembles from its database)."""

    plan: Plan
    weights: Callable[[str], LayerWeight] | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # facts for the model card and the CLI
    # BAQ: the uniform model its prediction is relative to (pass 1's rounded Linears), for an end-to-end check
    reference: dict[str, nn.Module] | None = None
