"""What the training stages (DiscQuant, distillation) share: the learning-rate schedule and the data order.

Both are functions of the step alone, so an interrupted run that resumes from a saved step sees the same
learning rates and the same windows as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup: int, steps: int) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def step_windows(step: int, per_step: int, n: int, seed: int) -> list[int]:
    """Indices into a pool of n windows for optimiser step `step`: the pool is walked in a fresh seeded
    permutation every epoch, `per_step` windows per step."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, j = divmod(i, n)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[j]))
    return out
