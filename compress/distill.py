"""Knowledge-distillation recovery: train what the recipe allows of the compressed model to match the original.

Teacher = the original model's next-token log-probs on the distillation windows (computed before any
weight is rounded, top-K + rest like EvoPress's; compress.teacher). Student = the compressed model.
Loss = T² · token-mean KL(teacher_T ‖ student_T) at `temperature` T (softmax(logits / T) on both sides),
plus `hidden_mse` × the normalised hidden-state MSE, ‖h_student − h_teacher‖² / ‖h_teacher‖² per window
averaged over the blocks' outputs, which needs the dense model itself alongside (`hidden_teacher`).
The windows (`data`) are the calibration windows, or text the teacher wrote itself: each calibration
window's first `prompt_tokens` tokens continued by sampling the dense model (compress.teacher.generate).
What trains (`train`):

    scales   every compressed Linear's scale (and μ of binary layers), codes fixed
    norms    the scales plus the RMSNorm/LayerNorm weights
    ste      every compressed weight through a straight-through estimator on the plan's fixed grid
             (latent fp32 weights; the forward sees them rounded), re-rounded onto the grid at the end;
             binary layers see mu + alpha·sign(w − mu) (mu, alpha fixed) and their salient weights the
             row's 8-bit grid, and `mst_reg` > 0 adds MST-compression's regularizer (compress/mst.py): the
             smooth count of sign disagreements along each layer's row tree (built once from the signs
             the training starts from), per binary weight, times mst_reg. At the end the signs are stored
             as their tree when that is smaller (always re-decided when mst_reg > 0).
    weights  the dense weights of the Linears inside the blocks (a model that is pruned, not quantized)

With `sparsity` > 0 (train=weights) the training prunes as ISS-P does (compress.prune): for the first
`prune_steps` steps, after every optimiser step the lowest-magnitude `sparsity` of each Linear is
multiplied by `iss_alpha` (recomputed every step); then the mask freezes, pruned weights are zeroed and
kept at zero, and their gradients and Adam moments are masked. `iss_alpha` = 0 is iterative hard
thresholding; `prune_steps` = 0 freezes the magnitude mask at once (magnitude pruning + the same budget).
In a recipe this stage runs *before* rounding (prune, then quantize): it needs `per_row` (the checkpoint
keeps the same count in every row) and the recipe's `weights.sparsity` equal to its own, so the rounding's
magnitude mask is exactly the zeros the training left, stored as a bitmask beside the kept codes.

AdamW (bitsandbytes' 8-bit AdamW on CUDA when installed) with linear warm-up and cosine decay, gradient
accumulation over `windows_per_step` windows in micro-batches of `batch_size`, optional gradient
checkpointing. The state (trained tensors, optimiser, schedule, loss history) is saved every `save_every`
steps; re-running resumes it, and the windows of step t depend on (seed, t) only, so a resumed run ends
where an uninterrupted one does.

Data parallel: under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) every process takes its share of
each step's windows and gradients are summed with all-reduce (gloo on CPU, NCCL on GPU), so the loss
curve matches one process with the same global batch. Only rank 0 writes state and logs.
The result is written back into the packed buffers: the checkpoint format does not change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress import grid, parallel, train
from compress.errors import CompressError
from compress.nn import CompressedLinear, set_module
from compress.plan import LayerWeight, Salient
from compress.recipe import require
from compress.teacher import Teacher

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Config:
    steps: int = 0  # 0 = no distillation
    windows_per_step: int = 8  # the global batch (over all processes)
    batch_size: int = 1  # windows per forward/backward on one process
    lr: float = 1e-4
    warmup: int = 16
    train: str = "scales"  # scales | norms | ste
    topk: int = 256  # teacher cache: dense top-K log-probs (+ rest); 0 = full vocabulary
    gradient_checkpointing: bool = False
    save_every: int = 32
    log_every: int = 8
    seed: int = 0
    sparsity: float = 0.0  # ISS-P target (train=weights)
    pattern: str = "unstructured"  # or n:m, e.g. 2:4
    iss_alpha: float = 0.999  # soft shrinkage factor during the pruning phase
    prune_steps: int = -1  # length of the pruning phase; -1 = half of the steps
    per_row: bool = False  # ISS-P ranks magnitudes per row, not per layer (recipes: the checkpoint's layout)
    mst_reg: float = 0.0  # train=ste: weight of the MST sign-distance regularizer on binary layers
    temperature: float = 1.0  # softmax temperature of teacher and student; the KL is scaled by T²
    hidden_mse: float = 0.0  # weight of the normalised per-block hidden-state MSE (0 = logits only)
    data: str = "calibration"  # calibration | generated (the teacher continues calibration prompts)
    prompt_tokens: int = 32  # data=generated: tokens of each calibration window kept as its prompt

    def __post_init__(self) -> None:
        require("distill", self, positive=("windows_per_step", "batch_size", "save_every", "log_every", "lr",
                                           "temperature", "prompt_tokens"),
                non_negative=("steps", "warmup", "topk", "seed", "mst_reg", "hidden_mse"), fraction=("iss_alpha",))
        if self.prune_steps < -1:
            raise CompressError(f"recipe value distill.prune_steps={self.prune_steps} is out of range; use -1 (half "
                                "of the steps) or a step count >= 0")
        if self.train not in ("scales", "norms", "ste", "weights"):
            raise CompressError(f"distill train={self.train!r} is invalid; choose scales, norms, ste or weights")
        if self.sparsity and self.train != "weights":
            raise CompressError("distill sparsity (ISS-P) prunes dense weights: use train=weights")
        if not 0 <= self.sparsity < 1:
            raise CompressError(f"recipe value distill.sparsity={self.sparsity} is out of range; it must be in [0, 1)")
        if self.mst_reg and self.train != "ste":
            raise CompressError("distill mst_reg trains the signs of binary layers: use train=ste")
        if self.data not in ("calibration", "generated"):
            raise CompressError(f"distill data={self.data!r} is invalid; choose calibration or generated")


# --- what trains --------------------------------------------------------------------------------------

class _STE(torch.autograd.Function):
    """Round onto the fixed grid in the forward, identity gradient in the backward."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, scale: Tensor, zero: Tensor, qmax: Tensor) -> Tensor:
        return grid.dequantize(grid.quantize(w, scale, zero, qmax), scale, zero)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        return g, None, None, None


class _SignSTE(torch.autograd.Function):
    """mu + alpha·sign(w − mu) (0 counted as +) in the forward, identity gradient in the backward."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, mu: Tensor, alpha: Tensor) -> Tensor:
        return mu + alpha * (2 * (w >= mu).float() - 1)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        return g, None, None


@dataclass
class BinaryGrid:
    """The fixed grid of a binary layer [N, K]: mu, alpha per element, the salient mask and 8-bit row grid,
    and (with mst_reg) the row tree and sharpness the regularizer uses."""

    mu: Tensor
    alpha: Tensor
    mask: Tensor
    s8: Tensor  # [N, 1]
    z8: Tensor  # [N, 1]
    parent: Tensor | None = None
    beta: float = 0.0

    def forward(self, w: Tensor) -> Tensor:
        W = _SignSTE.apply(w, self.mu, self.alpha)
        if self.mask.any():
            W = torch.where(self.mask, _STE.apply(w, self.s8, self.z8, 255), W)
        return W


def binary_grid(m: CompressedLinear, mst_reg: float) -> BinaryGrid:
    K, gw = m.in_features, m.spec.group_width(m.in_features)
    sal = m.salient_part()
    mask = torch.zeros(m.out_features, K, dtype=torch.bool, device=m.mu.device) if sal is None else sal.mask
    ones = torch.ones(m.out_features, 1, device=m.mu.device)
    bg = BinaryGrid(grid.expand(m.mu.float(), gw, K), grid.expand(m.scale.float(), gw, K), mask,
                     ones if sal is None else sal.scale, ones if sal is None else sal.zero)
    if mst_reg:
        from compress import mst

        bg.parent = mst.build(m.codes().bool().cpu()).parent.to(m.mu.device)
        bg.beta = 3.0 / max(float(m.scale.float().mean()), 1e-8)  # tanh(beta·(w − mu)) ≈ ±1 at |w − mu| = alpha
    return bg


@dataclass
class GroupGrid:
    """The fixed grid of a group-wise layer, per element [N, K]."""

    scale: Tensor
    zero: Tensor
    qmax: Tensor

    def forward(self, w: Tensor) -> Tensor:
        return _STE.apply(w, self.scale, self.zero, self.qmax)


def group_grid(m: CompressedLinear) -> GroupGrid:
    """Per-element (scale, zero, qmax) [N, K] of a group-wise layer."""
    K, gw = m.in_features, m.spec.group_width(m.in_features)
    qmax = grid.expand(torch.tensor([m.spec.group_bits(K)], dtype=torch.float32).exp2() - 1, gw, K)
    return GroupGrid(grid.expand(m.scale.float(), gw, K), grid.expand(m.zero_points(), gw, K), qmax.to(m.scale.device))


class STELinear(nn.Module):
    """A packed layer under train=ste: fp32 latent weights [N, K], which the forward rounds onto the layer's
    fixed grid (straight-through gradient; a pruned layer's pruned weights stay exactly 0). `pack()` re-rounds
    them into the packed layer."""

    def __init__(self, m: CompressedLinear, mst_reg: float = 0.0) -> None:
        super().__init__()
        if m.spec.kind == "levels":
            raise CompressError("distill train=ste needs group-wise or binary layers; use train=scales "
                                "for per-column-level layers")
        self.packed, self.mst_reg = m, mst_reg
        self.grid = binary_grid(m, mst_reg) if m.spec.kind == "binary" else group_grid(m)
        self.latent = nn.Parameter(m.dequantize())
        self.keep = m.decoded().keep  # bool [N, K] of a pruned layer, else None

    def forward(self, x: Tensor) -> Tensor:
        W = self.grid.forward(self.latent)
        if self.keep is not None:
            W = W * self.keep
        b = self.packed.bias
        return F.linear(x, W.to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def pack(self) -> CompressedLinear:
        """The packed layer with the latent weights' codes (binary layers: a new module, as their sign storage,
        plain or MST, may change size)."""
        m, w = self.packed, self.latent.detach()
        if isinstance(self.grid, BinaryGrid):
            return _pack_binary(m, self.grid, w, self.mst_reg)
        codes = grid.quantize(w, self.grid.scale, self.grid.zero, self.grid.qmax).to(torch.uint8)
        scale, zero = m.codec.grid(m.packed(), m.spec, m.out_features, m.in_features)
        m.qweight.copy_(m.codec.pack(LayerWeight(w, m.spec, codes, scale, zero, keep=self.keep))["qweight"])
        m._drop_kernel_state()
        return m


class ScaleLinear(nn.Module):
    """A packed layer under train=scales|norms: codes fixed, its scale (and μ of binary layers) trained as
    fp32 Parameters in place of the stored ones. `pack()` writes them back in their storage dtypes."""

    def __init__(self, m: CompressedLinear) -> None:
        super().__init__()
        self.packed = m
        for name in ("scale", "mu"):
            if hasattr(m, name):
                self.register_parameter(name, nn.Parameter(getattr(m, name).detach().float().clone()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.packed, dict(self.named_parameters(recurse=False)), (x,))

    @torch.no_grad()
    def pack(self) -> CompressedLinear:
        for name, p in self.named_parameters(recurse=False):
            getattr(self.packed, name).copy_(p)
        self.packed._drop_kernel_state()
        return self.packed


def mst_penalty(model: nn.Module) -> Tensor | None:
    """The MST regularizer of every binary layer under train=ste, per binary weight (None if none)."""
    from compress import mst

    terms, n = [], 0
    for m in model.modules():
        if isinstance(m, STELinear) and isinstance(m.grid, BinaryGrid) and m.grid.parent is not None:
            terms.append(mst.regularizer(m.latent - m.grid.mu, m.grid.parent, m.grid.beta))
            n += m.latent.numel()
    return torch.stack(terms).sum() / n if terms else None


def block_linears(model: nn.Module) -> list[nn.Linear]:
    """The dense Linears inside the decoder blocks (not the embeddings or lm_head)."""
    from compress import models

    return [m for m in models.blocks_of(model, models.arch_of(model)).modules() if isinstance(m, nn.Linear)]


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer (RMSNorm, LayerNorm and the models' own copies): a leaf module with a 1-D
    `weight` Parameter. Linear and Embedding weights are 2-D; packed layers have none."""
    w = getattr(m, "weight", None)
    return isinstance(w, nn.Parameter) and w.dim() == 1 and next(m.children(), None) is None


def prepare(model: nn.Module, train: str, mst_reg: float = 0.0) -> dict[str, nn.Parameter]:
    """Make what trains trainable and freeze the rest: packed layers are wrapped (STELinear for ste,
    ScaleLinear for scales and norms), norms (norms) and the blocks' dense Linears (weights) train in place.
    Returns the trained Parameters by name, in module order."""
    for p in model.parameters():
        p.requires_grad_(False)
    if train == "weights":
        for lin in block_linears(model):
            lin.weight.requires_grad_(True)
    else:
        for name, m in list(model.named_modules()):
            if isinstance(m, CompressedLinear):
                set_module(model, name, STELinear(m, mst_reg) if train == "ste" else ScaleLinear(m))
            elif train == "norms" and is_norm(m):
                m.weight.requires_grad_(True)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def finish(model: nn.Module) -> None:
    """Swap the packed layers back in, holding what was trained, and freeze everything."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (STELinear, ScaleLinear)):
            set_module(model, name, m.pack())
    for p in model.parameters():
        p.requires_grad_(False)


def _pack_binary(m: CompressedLinear, bg: BinaryGrid, w: Tensor, mst_reg: float) -> CompressedLinear:
    """A binary layer re-packed from latent weights `w` [N, K]: signs against mu, the salient weights on their
    8-bit row grid, the signs stored as their tree when that is smaller (always re-decided with mst_reg)."""
    from dataclasses import replace

    from compress.round import pbllm

    signs = (w >= bg.mu).to(torch.uint8)
    spec = replace(m.spec, signs="", edges=0)
    info: dict[str, float] = {}
    tree = None
    if mst_reg or m.spec.signs == "mst":
        spec, tree = pbllm.mst_signs(signs.bool().cpu(), spec, info)
    sal = None
    if spec.nnz:
        q8 = grid.quantize(w, bg.s8, bg.z8, 255).to(torch.uint8) * bg.mask
        sal = Salient(bg.mask, q8, bg.s8, bg.z8)
    lw = LayerWeight(w, spec).rounded(codes=signs, scale=m.scale, zero=m.mu, salient=sal, info=info, tree=tree)
    return CompressedLinear.from_weight(lw, None if m.bias is None else m.bias.detach())


# --- the loop ---------------------------------------------------------------------------------------------

Progress = train.Progress  # metrics: kl (the loss's mean KL per token), tokens_per_s


def distill(model: nn.Module, teach: Teacher, windows: Tensor, cfg: Config, *, workdir: Path | None = None,
            device: torch.device | str = "cpu", on_step: Callable[[Progress], None] | None = None,
            log: Callable[[str], None] | None = None, hidden_teacher: nn.Module | None = None) -> list[float]:
    """Train the compressed `model` in place toward the teacher's distributions on `windows` [n, T];
    returns the per-step loss history (T²·KL per token + hidden_mse × the hidden-state term, averaged over
    the global batch). `hidden_teacher` is the dense model, needed when `cfg.hidden_mse` > 0."""
    if cfg.hidden_mse and hidden_teacher is None:
        raise CompressError("distill hidden_mse > 0 needs the dense model (hidden_teacher) alongside the student")
    if teach.temperature != cfg.temperature:
        raise CompressError(f"the teacher's log-probs are at temperature {teach.temperature}, the recipe asks for "
                            f"{cfg.temperature}: recompute the teacher")
    device = parallel.init(device)
    model.to(device)
    params = prepare(model, cfg.train, cfg.mst_reg)
    opt = _optimizer(list(params.values()), cfg, device)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    trainer = train.Trainer("distill", params, opt, steps=cfg.steps, warmup=cfg.warmup,
                            state=None if workdir is None else workdir / "distill-state.safetensors",
                            save_every=cfg.save_every, log_every=cfg.log_every, lr_key="distill.lr", say=log,
                            describe=lambda p: f"loss {p.loss:.4f}, KL {p.metrics['kl']:.4f}, "
                                               f"{p.metrics['tokens_per_s']:.0f} tokens/s")
    loss = StepLoss(model, teach, windows, cfg, device, hidden_teacher, list(params.values()))
    model.train()
    try:
        with train.checkpointing(model, cfg.gradient_checkpointing):
            steps = trainer.resume()
            project = ISSP(list(params.values()), opt, cfg, trainer.start) if cfg.sparsity else None
            for _ in steps:
                trainer.step(loss, project)
                trainer.log(on_step, lambda: {"kl": loss.kl, "tokens_per_s": loss.tokens * parallel.world()
                                              / trainer.elapsed})
    finally:
        model.eval()
        finish(model)
    return trainer.history


class StepLoss:
    """The distillation loss of step t, as `Trainer.step` calls it: T²·KL(teacher ‖ student) per token, plus
    hidden_mse × the hidden-state term, over this process's share of the step's windows (micro-batches of
    `batch_size`), backpropagated as a mean over the global batch; the MST regularizer once per step; the
    gradients summed over the processes. Returns the global mean loss and keeps its KL and the tokens seen."""

    def __init__(self, model: nn.Module, teach: Teacher, windows: Tensor, cfg: Config, device: torch.device,
                 hidden_teacher: nn.Module | None, params: list[nn.Parameter]) -> None:
        self.model, self.teach, self.windows, self.cfg, self.device = model, teach, windows, cfg, device
        self.hidden_teacher, self.params = hidden_teacher, params
        self.kl, self.tokens = float("nan"), 0

    def __call__(self, step: int) -> float:
        cfg, rank, world = self.cfg, parallel.rank(), parallel.world()
        batch = train.step_windows(step, cfg.windows_per_step, len(self.windows), cfg.seed)
        mine = batch[rank::world]
        sums = torch.zeros(2, dtype=torch.float64)  # loss, KL summed over my windows
        for i in range(0, len(mine), cfg.batch_size):
            w = torch.tensor(mine[i : i + cfg.batch_size])
            x = self.windows[w].to(self.device)  # [b, T]
            out = self.model(input_ids=x, use_cache=False, output_hidden_states=bool(cfg.hidden_mse))
            kl = self.teach.kl(out.logits, w).mean(-1)  # [b]
            per_window = cfg.temperature**2 * kl
            if cfg.hidden_mse:
                per_window = per_window + cfg.hidden_mse * hidden_nmse(out.hidden_states, self.hidden_teacher, x)
            (per_window.sum() / len(batch)).backward()  # mean over the global batch
            sums += torch.stack([per_window.detach().sum(), kl.detach().sum()]).double()
            self.tokens += x[:, 1:].numel()
        if cfg.mst_reg and rank == 0 and (pen := mst_penalty(self.model)) is not None:
            (cfg.mst_reg * pen).backward()  # once per step (rank 0 only: the all-reduce sums the grads)
        if world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                parallel.all_sum(p.grad)
            parallel.all_sum(sums)
        loss, self.kl = (float(v) / len(batch) for v in sums)
        return loss


def hidden_nmse(hidden: tuple[Tensor, ...], dense: nn.Module, x: Tensor) -> Tensor:
    """Normalised hidden-state MSE per window [b]: Σ‖h_s − h_t‖² / Σ‖h_t‖² over each block's output,
    averaged over the blocks (hidden[0], the embeddings, is left out; the student's are differentiable)."""
    with torch.no_grad():
        ref = dense(input_ids=x, use_cache=False, output_hidden_states=True).hidden_states
    terms = [((h.float() - t.float()) ** 2).sum((1, 2)) / (t.float() ** 2).sum((1, 2)).clamp_min(1e-12)
             for h, t in zip(hidden[1:], ref[1:], strict=True)]
    return torch.stack(terms).mean(0)


def _prune_steps(cfg: Config) -> int:
    return cfg.steps // 2 if cfg.prune_steps < 0 else cfg.prune_steps


class ISSP:
    """ISS-P after every optimiser step: soft shrinkage during the pruning phase, then a frozen mask whose
    pruned weights, and their Adam moments, stay zero. A run resumed after the pruning phase takes the mask
    from the zeros of the resumed weights."""

    def __init__(self, params: list[nn.Parameter], opt: torch.optim.Optimizer, cfg: Config, start: int) -> None:
        self.params, self.opt, self.cfg = params, opt, cfg
        self.masks = [p.detach() != 0 for p in params] if start > 0 and start >= _prune_steps(cfg) else None

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        from compress import prune

        cfg = self.cfg
        if step + 1 < _prune_steps(cfg):
            for p in self.params:
                prune.soft_shrink_(p.data, cfg.sparsity, cfg.iss_alpha, cfg.pattern, cfg.per_row)
            return
        if self.masks is None:  # the end of the pruning phase: freeze the current magnitude mask
            self.masks = [prune.magnitude(p.data, cfg.sparsity, cfg.pattern, cfg.per_row) for p in self.params]
        for p, keep in zip(self.params, self.masks, strict=True):
            p.data.mul_(keep)
            for v in self.opt.state.get(p, {}).values():  # Adam moments of pruned weights stop pushing them
                if isinstance(v, Tensor) and v.shape == p.shape and v.is_floating_point():  # (not 8-bit codes)
                    v.mul_(keep)


def _optimizer(params: list[nn.Parameter], cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=0.0)
        except Exception as e:  # bitsandbytes missing or unsupported here: plain AdamW
            log.warning("distill: bitsandbytes' 8-bit AdamW is unavailable (%s); using torch AdamW", e)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
