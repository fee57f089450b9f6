"""DiscQuant (Chee, Backurs, Heck, Zhang, Kulkarni, Rothvoss, Gopi, COLT 2025; jerry-chee/DiscQuant):
round every weight of the model jointly, on a fixed grid, so that the output distribution moves least.

The grid is the plan's, fitted exactly as RTN fits it (min-max per group, or BAQ's per-column levels), so
DiscQuant composes with any allocation and writes the same checkpoints. Every weight w sits between its
grid neighbours down(w) ≤ w ≤ up(w) (codes d and d + s, s ∈ {0, 1}); a variable x ∈ [0, 1] interpolates:

    W_x = scale · (d + s·x − zero),     y = (w/scale + zero) − d  is the original (x = y gives W back)

Training, as the reference does it:
    loss      D(x) = mean-token KL(dense ‖ W_x model) / δ²,  δ² = mean over Linears of 12·mean((RTN(W) − W)²)
    gradient  g = −c + clamp(ρ·∇D, −κ, κ),  c = 2y − 1     (the linear term pulls x to the RTN vertex;
                                                              the KL can only overturn it where |c| < κ)
    step      AdamW(lr, weight_decay 0.01) with warm-up + cosine, then x ← clamp(x, 0, 1)
    finally   codes = d + s·[x > ½]

Only the x's train; the Linear weights stay frozen (they are the teacher when `topk` = 0). The teacher's
log-probs are cached (top-K, on disk in the work directory) when `topk` > 0. The state (x, optimiser,
schedule) is saved every `save_every` steps: an interrupted run resumes and ends where an uninterrupted one
would (the windows of step t are a function of (seed, t) only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress import grid, train
from compress.errors import CompressError
from compress.nn import set_module
from compress.plan import LayerWeight, Plan
from compress.recipe import require
from compress.round import rtn
from compress.teacher import Teacher, cached


@dataclass(frozen=True)
class Config:
    needs_hessian: ClassVar[bool] = False  # facts of the method, not recipe knobs
    needs_calibration: ClassVar[bool] = True  # (needs windows without a Hessian: a joint method)
    steps: int = 1024  # optimiser steps (reference: 1024)
    windows_per_step: int = 8  # calibration windows per step (reference: 8 x 2048 tokens)
    batch_size: int = 1  # windows per forward/backward; gradients accumulate up to windows_per_step
    lr: float = 0.05  # reference table for Llama-3.1-8B 3-bit g64: 0.05
    clamp: float = 1.0  # κ, bound on the scaled KL gradient (reference table: 0.5-1.0 on min-max grids)
    rho: float = 200.0  # ρ, the KL gradient's weight against the linear term (reference scripts: 200)
    warmup: int = 128  # linear warm-up steps, then cosine to 0
    weight_decay: float = 0.01  # AdamW default, which the reference leaves on
    init: str = "rand"  # rand (reference default: x ~ U[0, 1]) | orig (x = y)
    topk: int = 0  # 0: full-vocabulary KL, teacher = the frozen weights each step; K: cached dense top-K
    gradient_checkpointing: bool = False  # trade compute for activation memory (the reference turns it on)
    save_every: int = 32  # steps between saved states (work directory runs only)
    log_every: int = 8
    seed: int = 42

    def __post_init__(self) -> None:
        require("round", self, positive=("steps", "windows_per_step", "batch_size", "lr", "clamp", "save_every",
                                         "log_every"),
                non_negative=("rho", "warmup", "weight_decay", "topk", "seed"))
        if self.windows_per_step % self.batch_size:
            raise CompressError(f"discquant windows_per_step={self.windows_per_step} must be a multiple of "
                                f"batch_size={self.batch_size}")
        if self.init not in ("rand", "orig"):
            raise CompressError(f"discquant init={self.init!r} is invalid; choose rand or orig")


# --- the parametrisation ------------------------------------------------------------------------------

class RoundingLinear(nn.Module):
    """A Linear whose weight is W_x = scale·(d + s·x − zero) between the grid neighbours of the frozen W.

    weight: fp32 [N, K] frozen original; d: uint8 [N, K] lower code; s: bool [N, K] whether up > down;
    c: fp16 [N, K] = 2y − 1; x: fp32 [N, K] the trained variable. scale/zero are per element ([N, K])
    for per-column level grids, else per group ([N, G]) and expanded on the fly.
    """

    def __init__(self, lw: LayerWeight, bias: Tensor | None) -> None:
        super().__init__()
        W = lw.W.float()
        N, K = W.shape
        ref = rtn.apply(lw, None, rtn.Config())  # the plan's grid, fitted as every method fits it
        self.spec, self.shape = lw.spec, (N, K)
        levels = lw.spec.levels if lw.spec.kind == "levels" else None
        self.gs = K if levels is not None else lw.spec.group_width(K)
        if levels is not None:
            S, Z = grid.levels_grid(ref.scale, ref.zero, levels)
            qmax = (torch.tensor(levels, dtype=torch.float32) - 1).expand(N, K)
        else:
            S, Z = grid.expand(ref.scale, self.gs, K), grid.expand(ref.zero, self.gs, K)
            qmax = grid.expand(torch.tensor([lw.spec.group_bits(K)], dtype=torch.float32).exp2() - 1, self.gs, K)
        q = torch.where(S > 0, W / S.where(S > 0, torch.ones_like(S)) + Z, Z)  # position on the code axis
        d = torch.minimum(q.floor().clamp_min(0), qmax)
        up = torch.minimum(q.ceil().clamp_min(0), qmax)
        s = up > d
        y = torch.where(s, q - d, torch.full_like(q, 0.5))
        self.register_buffer("weight", W, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.register_buffer("d", d.to(torch.uint8), persistent=False)
        self.register_buffer("s", s, persistent=False)
        self.register_buffer("c", (2 * y - 1).half(), persistent=False)
        self.register_buffer("scale", S if levels is not None else ref.scale, persistent=False)
        self.register_buffer("zero", Z if levels is not None else ref.zero, persistent=False)
        self.ref_scale, self.ref_zero = ref.scale, ref.zero  # what the checkpoint stores
        self.rtn_mse = float((ref.dequantize() - W).pow(2).mean())
        self.x = nn.Parameter(y.clone())
        self.mode = "x"  # x | original

    def element_grid(self) -> tuple[Tensor, Tensor]:
        if self.scale.shape == self.shape:
            return self.scale, self.zero
        K = self.shape[1]
        return grid.expand(self.scale, self.gs, K), grid.expand(self.zero, self.gs, K)

    def interpolated(self) -> Tensor:
        """W_x [N, K], differentiable in x."""
        S, Z = self.element_grid()
        return S * (self.d.float() + self.s * self.x - Z)

    def forward(self, inp: Tensor) -> Tensor:
        W = self.weight if self.mode == "original" else self.interpolated()
        return F.linear(inp, W.to(inp.dtype), None if self.bias is None else self.bias.to(inp.dtype))

    def rounded(self) -> LayerWeight:
        """The final rounding: codes = d + s·[x > ½], on the grid the checkpoint stores."""
        codes = (self.d + (self.s & (self.x.detach() > 0.5))).to(torch.uint8)
        lw = LayerWeight(self.weight, self.spec, codes, self.ref_scale, self.ref_zero)
        lw.info = {"fractional": float(((self.x > 0) & (self.x < 1) & self.s).float().mean())}
        return lw


def direction(grad: Tensor, c: Tensor, rho: float, kappa: float) -> Tensor:
    """The reference's update direction: −c + clamp(ρ·∇D, −κ, κ)."""
    return (rho * grad).clamp_(-kappa, kappa).sub_(c.float())


# --- training ---------------------------------------------------------------------------------------

Progress = train.Progress  # metrics: at_vertex, the share of variables at 0 or 1


def _kl(model: nn.Module, ids: Tensor, windows: Tensor, teach: Teacher | None,
        layers: list[RoundingLinear]) -> Tensor:
    """Mean-token KL(dense ‖ model) over windows `windows` of the pool `ids`, differentiable in the x's."""
    batch = ids[windows]
    if teach is None:  # the frozen weights are the teacher
        for m in layers:
            m.mode = "original"
        with torch.no_grad():
            p = F.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)
        for m in layers:
            m.mode = "x"
        q = F.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)
        return (p.exp() * (p - q)).sum(-1).mean()
    return teach.kl(model(input_ids=batch, use_cache=False).logits, windows).mean()


def _step(step: int, model: nn.Module, ids: Tensor, teach: Teacher | None, layers: list[RoundingLinear],
          cfg: Config, delta2: float) -> float:
    """Step `step`'s KL D(x) over its windows (micro-batches of `batch_size`, gradients accumulated); leaves
    the update direction, not the plain gradient, in every x.grad. Returns the mean KL."""
    windows = torch.tensor(train.step_windows(step, cfg.windows_per_step, len(ids), cfg.seed))
    kl_sum, micro = 0.0, cfg.windows_per_step // cfg.batch_size
    for i in range(0, cfg.windows_per_step, cfg.batch_size):
        kl = _kl(model, ids, windows[i : i + cfg.batch_size], teach, layers)
        (kl / (micro * delta2)).backward()
        kl_sum += float(kl.detach()) / micro
    with torch.no_grad():
        for m in layers:
            m.x.grad = direction(m.x.grad, m.c, cfg.rho, cfg.clamp)
    return kl_sum


def _clamp(layers: list[RoundingLinear]) -> None:
    """Project every x back onto [0, 1]."""
    for m in layers:
        m.x.clamp_(0, 1)


def _at_vertex(layers: list[RoundingLinear]) -> float:
    """The share of variables at 0 or 1 (weights already on a grid point count as there)."""
    return sum(float(((m.x == 0) | (m.x == 1) | ~m.s).sum()) for m in layers) / sum(m.x.numel() for m in layers)


def _swap_in(model: nn.Module, plan: Plan, cfg: Config, device: torch.device) -> dict[str, RoundingLinear]:
    """Replace every Linear of `plan` by its RoundingLinear (x initialised per `cfg.init`, rand drawing from
    its own generator seeded with `cfg.seed`, so the global RNG is neither read nor moved); only the x's
    train. Returns them by name."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    layers = {}
    for name, spec in plan.layers.items():
        lin = model.get_submodule(name)
        rl = RoundingLinear(LayerWeight(lin.weight.detach().float(), spec), lin.bias).to(device)
        if cfg.init == "rand":
            rl.x.data.uniform_(0, 1, generator=gen)
        layers[name] = rl
        set_module(model, name, rl)
    for p in model.parameters():
        p.requires_grad_(False)
    for rl in layers.values():
        rl.x.requires_grad_(True)
    return layers


def round_model(model: nn.Module, plan: Plan, ids: Tensor, cfg: Config, *, workdir: Path | None = None,
                device: torch.device | str = "cpu", on_step: Callable[[Progress], None] | None = None,
                log: Callable[[str], None] | None = None) -> tuple[dict[str, LayerWeight], dict[str, Any]]:
    """Round every Linear of `plan` jointly; returns each one's LayerWeight and a summary (steps, tokens,
    KL history). The model is left as it came (dense Linears), so the caller swaps in packed Linears."""
    say = log or (lambda s: None)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    model.to(device)
    ids = ids.to(device)
    teach = None
    if cfg.topk:
        path = None if workdir is None else workdir / "teacher.safetensors"
        say(f"DiscQuant: dense top-{cfg.topk} log-probs on {ids.numel()} calibration tokens")
        teach = cached(path, model, ids, cfg.topk, cfg.batch_size, device)
    originals = {name: model.get_submodule(name) for name in plan.layers}
    layers = _swap_in(model, plan, cfg, device)
    mods = list(layers.values())
    delta2 = sum(12 * m.rtn_mse for m in mods) / len(mods)  # ≈ mean squared grid step
    opt = torch.optim.AdamW([m.x for m in mods], lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = None if workdir is None else workdir / "discquant-state.safetensors"
    trainer = train.Trainer("DiscQuant", {n: m.x for n, m in layers.items()}, opt, steps=cfg.steps, warmup=cfg.warmup,
                            state=state, save_every=cfg.save_every, log_every=cfg.log_every, lr_key="round.lr", say=say,
                            describe=lambda p: f"KL {p.loss:.4f}, {p.metrics['at_vertex']:.1%} at a vertex")
    try:
        with train.checkpointing(model, cfg.gradient_checkpointing):
            for _ in trainer.resume():
                trainer.step(lambda step: _step(step, model, ids, teach, mods, cfg, delta2), lambda _: _clamp(mods))
                trainer.log(on_step, lambda: {"at_vertex": _at_vertex(mods)})
    finally:
        out = {name: layers[name].rounded() for name in originals}
        for name, orig in originals.items():
            set_module(model, name, orig)
    history = trainer.history
    for lw in out.values():
        lw.info["kl_last"] = history[-1] if history else float("nan")
    n = sum(m.x.numel() for m in mods)
    summary = {"method": "discquant", "steps": cfg.steps, "windows_per_step": cfg.windows_per_step,
               "tokens": cfg.steps * cfg.windows_per_step * ids.shape[1], "train_kl": history,
               "fractional_before_rounding": sum(lw.info["fractional"] * lw.W.numel() for lw in out.values()) / n,
               "seconds": trainer.elapsed}
    return out, summary


def apply(lw: LayerWeight, H: Tensor | None, cfg: Config) -> LayerWeight:
    raise CompressError("discquant rounds the whole model at once, not layer by layer; "
                        "it runs as the pipeline's rounding stage (round.method=discquant)")
