"""What an allocator gets to work with, and what it hands back to the pipeline."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compress.models import Arch
from compress.plan import LayerWeight, Plan


@dataclass
class Context:
    """The model (dense, in place), its block layout, the uniform plan from the recipe, calibration windows."""

    model: nn.Module
    arch: Arch
    base: Plan  # the recipe's weights spec after overrides, one entry per Linear to compress
    pinned: set[str]  # Linears whose bits an override fixed: allocators keep them and leave them out of the budget
    windows: Tensor | None
    recipe: Any  # compress.recipe.Recipe
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workdir: Path | None = None  # where resumable state lives (level database, search state)
    progress: Callable[[Any], None] | None = None  # receives sequential.BlockReport of the allocator's passes
    log: Callable[[str], None] = logging.getLogger("compress.allocate").info


@dataclass
class Allocation:
    """The plan, optionally with every Linear already rounded (EvoPress assembles from its database)."""

    plan: Plan
    weights: Callable[[str], LayerWeight] | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # facts for the model card and the CLI
    # BAQ: the uniform model its prediction is relative to (pass 1's rounded Linears), for an end-to-end check
    reference: dict[str, nn.Module] | None = None
