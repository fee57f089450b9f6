"""Block-wise reconstruction after rounding (EfficientQAT's Block-AP, Chen et al. 2024): train each rounded block
so that it reproduces the dense block.

For block i, with X the quantized model's hidden states entering it and Y the dense block's outputs on the dense
model's hidden states (the same tokens; sequential.Twin runs that stream):

    minimise  mean ‖block_q(X) − Y‖²   over every packed Linear's weights and group scales
              (loss=token: mean over tokens t of ‖block_q(X)_t − Y_t‖² / ‖Y_t‖², each token's relative error)
    block_q:  Ŵ = s · (clamp(⌊w/s⌉ + z, 0, qmax) − z)      ⌊·⌉ straight-through, z and qmax fixed

The latent weights w start at the rounding's own decoded weights (GPTQ's codes: training starts from its
result, not from round-to-nearest) and the scales s at the stored ones, both measured in each group's grid step
(APLinear); AdamW with separate learning rates for weights and scales, cosine decay, `batch_size` windows a step,
in a seeded order each epoch. The trained block is re-rounded onto the stored grid (codes from w with the scale as
stored, in its storage dtype: the training already sees the scales in that dtype), at the epoch whose
mean output error over the training windows was lowest, and kept only if that error is lower than before
training: reconstruction never makes a block worse on the data it saw. Norms, biases and dense parameters stay as
they are.

    train_block(block, inputs, targets, calls, cfg, device) -> (error before, error after)

Only affine group-wise layers train (the grids every runtime serves); other kinds are refused by `check` when the
plan is made. A block is trained whole or not at all, and it is written to the work directory only when done,
so a killed run recomputes that block from the same start and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress import grid, train
from compress.errors import CompressError
from compress.models import block_output, to_device
from compress.nn import CompressedLinear, set_module
from compress.plan import LayerWeight, Plan
from compress.recipe import Recipe, Reconstruct
from compress.round import joint

log = logging.getLogger(__name__)
Config = Reconstruct
KINDS = ("affine",)


def check(recipe: Recipe, plan: Plan) -> None:
    """Refuse, before any calibration, what the reconstruction cannot train: layers of other kinds, and roundings
    that do not go block by block through the calibration driver."""
    if not recipe.reconstruct.epochs:
        return
    other = sorted({spec.kind for spec in plan.layers.values() if spec.kind not in KINDS})
    if other:
        raise CompressError(f"reconstruct trains affine group-wise layers; this plan also has {', '.join(other)} "
                            "layers: set reconstruct.epochs=0 or use an affine grid (weights.bits/group_size)")
    if joint(recipe.round.method) or not recipe.round.config.needs_hessian:
        raise CompressError(f"reconstruct follows a calibrated block-by-block rounding (gptq); round.method="
                            f"{recipe.round.method} has none: use round.method=gptq or set reconstruct.epochs=0")
    if getattr(recipe.allocate.config, "rounds", False):
        raise CompressError(f"reconstruct follows a block-by-block rounding; allocate.method={recipe.allocate.method}"
                            " rounds every Linear itself: use another allocator or set reconstruct.epochs=0")


class _Round(torch.autograd.Function):
    """⌊x⌉ in the forward, the identity gradient in the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return g


class APLinear(nn.Module):
    """A packed affine layer under training: latent weights w = u·s₀ and group scales s = σ·s₀ with u [N, K] and
    σ [N, G] fp32 Parameters, zero points and widths fixed; the forward decodes w on the trained grid
    (straight-through rounding).

    Both are in units of each group's initial grid step s₀: Adam moves every parameter by about the learning rate
    per step whatever its gradient's size, so in these units `lr` is a fraction of a grid step, and `scale_lr` a
    relative change of the scale, in every layer alike (in raw units one rate is many grid steps of a layer with
    small weights and a fraction of one elsewhere: SmolLM2's first block got 60x worse after one epoch at 1e-3)."""

    def __init__(self, m: CompressedLinear) -> None:
        super().__init__()
        self.packed = m
        K = m.in_features
        self.gw = m.spec.group_width(K)
        s0 = m.scale.detach().float().clamp_min(1e-8)  # [N, G]
        self.register_buffer("s0", s0)
        self.register_buffer("step", grid.expand(s0, self.gw, K))  # [N, K]
        self.latent = nn.Parameter(m.dequantize().float() / self.step)  # [N, K] in grid steps
        self.ratio = nn.Parameter(torch.ones_like(s0))  # [N, G] the scales relative to the rounding's
        self.register_buffer("zero", grid.expand(m.zero_points().float(), self.gw, K))  # [N, K]
        bits = torch.tensor([m.spec.group_bits(K)], dtype=torch.float32, device=s0.device)
        self.register_buffer("qmax", grid.expand(bits.exp2() - 1, self.gw, K))  # [1, K]

    @property
    def weight(self) -> Tensor:
        return self.latent * self.step  # [N, K]

    def stored(self) -> Tensor:
        """The group scales as they will be stored [N, G]: positive, in the storage dtype (straight-through), so
        that what trains is exactly what `pack` writes."""
        s = (self.ratio * self.s0).clamp_min(1e-8)
        return s + (s.to(self.packed.scale.dtype).float() - s).detach()

    def codes(self, s: Tensor) -> Tensor:
        """Codes of the latent weights on the grid of scales s [N, K] (a group whose stored scale is 0 decodes to 0
        whatever its codes)."""
        q = _Round.apply(self.weight / s.where(s > 0, torch.ones_like(s))) + self.zero
        return torch.minimum(q.clamp_min(0), self.qmax)

    def decoded(self) -> Tensor:
        s = grid.expand(self.stored(), self.gw, self.packed.in_features)  # [N, K]
        return s * (self.codes(s) - self.zero)

    def forward(self, x: Tensor) -> Tensor:
        b = self.packed.bias
        return F.linear(x, self.decoded().to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def pack(self) -> CompressedLinear:
        """The packed layer holding the trained codes and scales (scales in their storage dtype, codes rounded
        with exactly those scales)."""
        m = self.packed
        stored = self.stored().to(m.scale.dtype)  # [N, G]
        codes = self.codes(grid.expand(stored.float(), self.gw, m.in_features)).to(torch.uint8)
        zero = m.zero_points()
        for name, t in m.codec.pack(LayerWeight(self.weight.detach(), m.spec, codes, stored, zero)).items():
            getattr(m, name).copy_(t)
        m._drop_kernel_state()
        return m


class _First(Sequence):
    """The first n items of a sequence (a list, or a Spill of hidden states on disk), each read when indexed."""

    def __init__(self, items: Sequence[Tensor], n: int) -> None:
        self.items, self.n = items, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.items[i % self.n]


def _output(block: nn.Module, x: Tensor, call: tuple[tuple[Any, ...], dict[str, Any]], device: torch.device) -> Tensor:
    args, kw = call
    return block_output(block(x.to(device, torch.float32), *to_device(args, device), **to_device(kw, device)))


def _rows(obj: Any, B: int, rows: slice) -> Any:
    """A calibration batch's block arguments cut to some of its B windows: every tensor of two or more dimensions
    whose first one is B (masks, position ids, rotary tables per window); broadcast ones ([1, ...]) stay whole."""
    if isinstance(obj, Tensor):
        return obj[rows] if obj.dim() >= 2 and obj.shape[0] == B and B > 1 else obj
    if isinstance(obj, tuple | list):
        return type(obj)(_rows(o, B, rows) for o in obj)
    if isinstance(obj, dict):
        return {k: _rows(v, B, rows) for k, v in obj.items()}
    return obj


def errors(out: Tensor, y: Tensor, loss: str) -> Tensor:
    """The per-element (mse) or per-token (token) errors of block outputs `out` against targets `y` [B, T, H]:
    (out − y)² [B, T, H], or ‖out_t − y_t‖² / ‖y_t‖² [B, T]; the loss is their mean."""
    d = (out - y) ** 2
    if loss == "mse":
        return d
    return d.sum(-1) / (y * y).sum(-1).clamp_min(torch.finfo(y.dtype).tiny)


@torch.no_grad()
def _error(block: nn.Module, inputs: Sequence[Tensor], targets: Sequence[Tensor], calls: Sequence[Any],
           device: torch.device, loss: str) -> float:
    """The loss of the block's outputs against the targets over every window (float64 sum)."""
    total, count = 0.0, 0
    for x, y, call in zip(inputs, targets, calls, strict=True):
        e = errors(_output(block, x, call, device), y.to(device, torch.float32), loss)
        total += float(e.double().sum())
        count += e.numel()
    return total / max(count, 1)


def train_block(block: nn.Module, inputs: Sequence[Tensor], targets: Sequence[Tensor], calls: Sequence[Any],
                cfg: Config, device: torch.device, say: Callable[[str], None] | None = None) -> tuple[float, float]:
    """Train the packed Linears of `block` (float32, on `device`) toward `targets` from `inputs` (per calibration
    batch: [B, T, H] each, with the block's other arguments `calls`); returns the mean output error before and
    after (after = before when the training did not lower it and the block was left as it was)."""
    if cfg.samples:  # the first `samples` windows, in whole calibration batches (read lazily: they may be spilled)
        b = min(len(inputs), math.ceil(cfg.samples / max(1, inputs[0].shape[0])))
        inputs, targets, calls = _First(inputs, b), _First(targets, b), calls[:b]
    before = _error(block, inputs, targets, calls, device, cfg.loss)
    pieces = [(i, j) for i, x in enumerate(inputs) for j in range(0, x.shape[0], cfg.batch_size)]  # optimiser steps
    packed = {n: m for n, m in block.named_modules() if isinstance(m, CompressedLinear)}
    if not packed or not cfg.epochs:
        return before, before
    saved = {n: {k: t.clone() for k, t in m.packed().items()} for n, m in packed.items()}
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    wrapped = {n: APLinear(m) for n, m in packed.items()}
    for n, w in wrapped.items():
        set_module(block, n, w)
    weights = [w.latent for w in wrapped.values()]
    scales = [w.ratio for w in wrapped.values()]
    opt = torch.optim.AdamW([{"params": weights, "lr": cfg.lr}, {"params": scales, "lr": cfg.scale_lr}],
                            weight_decay=0.0)
    base = [g["lr"] for g in opt.param_groups]
    n = len(pieces)
    steps = cfg.epochs * n
    best, kept = before, [p.detach().clone() for p in (*weights, *scales)]
    try:
        with torch.enable_grad():
            for step in range(steps):
                for g, lr in zip(opt.param_groups, base, strict=True):
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                (k,) = train.step_windows(step, 1, n, cfg.seed)
                i, j = pieces[k]
                rows = slice(j, j + cfg.batch_size)
                B = inputs[i].shape[0]
                out = _output(block, inputs[i][rows], _rows(calls[i], B, rows), device)
                loss = errors(out, targets[i][rows].to(device, torch.float32), cfg.loss).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if (step + 1) % n == 0:  # an epoch's end: keep the best weights and scales seen so far
                    err = _error(block, inputs, targets, calls, device, cfg.loss)
                    if err < best:
                        best, kept = err, [p.detach().clone() for p in (*weights, *scales)]
        with torch.no_grad():
            for p, k in zip((*weights, *scales), kept, strict=True):
                p.copy_(k)
    finally:
        for name, w in wrapped.items():
            set_module(block, name, w.pack())
        for p in frozen:
            p.requires_grad_(True)
    after = _error(block, inputs, targets, calls, device, cfg.loss)
    if not after < before:  # no gain on the windows it trained on: the block as it was rounded
        with torch.no_grad():
            for name, m in packed.items():
                for k, t in saved[name].items():
                    getattr(m, k).copy_(t)
                m._drop_kernel_state()
        after = before
    if say is not None:
        say(f"reconstruct: output error {before:.4g} -> {after:.4g} ({steps} steps)")
    return before, after
