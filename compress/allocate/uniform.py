"""Uniform allocation: the recipe's `weights` spec everywhere (overrides applied)."""

from __future__ import annotations

from dataclasses import dataclass

from compress.allocate.context import Allocation, Context


@dataclass(frozen=True)
class Config:
    needs_calibration: bool = False


def allocate(ctx: Context, cfg: Config) -> Allocation:
    return Allocation(ctx.base)
