"""Uniform allocation: the recipe's `weights` spec everywhere (overrides applied)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from compress.allocate.context import Allocation, Context


@dataclass(frozen=True)
class Config:
    needs_calibration: ClassVar[bool] = False  # a fact of the allocator, not a recipe knob


def allocate(ctx: Context, cfg: Config) -> Allocation:
    return Allocation(ctx.base)
