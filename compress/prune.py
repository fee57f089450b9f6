"""Pruning primitives: one-shot magnitude and Wanda masks, N:M patterns, and ISS-P's soft shrinkage.

Masks are bool [N, K] with True = kept. Patterns:
    unstructured   the lowest-scoring `sparsity` fraction of each comparison group is pruned
    "n:m"          in every run of m consecutive input columns of a row, the n lowest are pruned
                   (2:4 = two zeros in every four, what sparse tensor cores run)

Scores and groups, as the reference codes use them (methods-binprune.md §6):
    magnitude      |w|, one threshold per layer (Wanda's magnitude baseline; per row for n:m)
    wanda          |w| · ‖x_j‖₂ with the input norms from calibration, per output row, no weight update

ISS-P (Iterative Soft Shrinkage-Percentage; methods-binprune.md §5): during training, after every
optimiser step the lowest-magnitude fraction of each layer (recomputed every step, so weights can grow
back) is multiplied by α instead of zeroed; when the pruning phase ends the mask is frozen, the pruned
weights are zeroed and stay zero. With LLM learning rates α must be close to 1 (≈ 0.999) for regrowth to
be possible: a weight pushed by ~lr per step settles near lr / (1 − α).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from compress.codecs.pruned import parse_pattern
from compress.errors import CompressError

if TYPE_CHECKING:
    from compress.plan import LayerSpec

__all__ = ["choose", "input_norms", "magnitude", "mask_from_scores", "parse_pattern", "soft_shrink_", "wanda"]


def mask_from_scores(score: Tensor, sparsity: float, pattern: str = "unstructured", per_row: bool = True) -> Tensor:
    """Keep-mask [N, K] pruning the lowest scores: `sparsity` per row (or per layer), or n of every m."""
    N, K = score.shape
    nm = parse_pattern(pattern)
    if nm is not None:
        n, m = nm
        if K % m:
            raise CompressError(f"in_features={K} is not a multiple of {m}: the {pattern} pattern does not fit")
        groups = score.reshape(N, K // m, m)
        drop = groups.topk(n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(N, K)
    if not 0 <= sparsity < 1:
        raise CompressError(f"sparsity={sparsity} must be in [0, 1)")
    keep = torch.ones(N, K, dtype=torch.bool, device=score.device)
    if per_row:
        k = math.floor(sparsity * K)
        if k:
            keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    else:
        k = math.floor(sparsity * N * K)
        if k:
            keep.view(-1)[score.flatten().topk(k, largest=False).indices] = False
    return keep


def magnitude(W: Tensor, sparsity: float, pattern: str = "unstructured", per_row: bool = False) -> Tensor:
    """Magnitude keep-mask: one threshold over the whole layer, or per row (always per row for n:m)."""
    return mask_from_scores(W.abs(), sparsity, pattern, per_row=per_row)


def wanda(W: Tensor, input_norm: Tensor, sparsity: float, pattern: str = "unstructured") -> Tensor:
    """Wanda keep-mask: |W_ij| · ‖X_j‖₂ per output row; `input_norm` [K] from calibration activations
    (e.g. sqrt of the Hessian diagonal, which is proportional to Σ x_j²)."""
    return mask_from_scores(W.abs() * input_norm.to(W.device, W.dtype).unsqueeze(0), sparsity, pattern,
                            per_row=True)


@torch.no_grad()
def soft_shrink_(W: Tensor, sparsity: float, alpha: float, pattern: str = "unstructured",
                 per_row: bool = False) -> Tensor:
    """ISS-P's step, in place: multiply the lowest-magnitude weights (layer-local, or row-local) by α;
    returns their mask (True = shrunk, i.e. currently pruned)."""
    pruned = ~magnitude(W, sparsity, pattern, per_row)
    W[pruned] *= alpha
    return pruned


@torch.no_grad()
def input_norms(model: torch.nn.Module, linears: dict[str, torch.nn.Linear], windows: Tensor,
                batch_size: int = 8) -> dict[str, Tensor]:
    """‖X_j‖₂ [K] of every Linear's inputs over the calibration windows (one dense forward pass, hooks)."""
    sq = {n: torch.zeros(lin.in_features, dtype=torch.float64) for n, lin in linears.items()}

    def hook(name: str) -> Callable[[torch.nn.Module, tuple[Tensor, ...], Tensor], None]:
        def f(_: torch.nn.Module, inp: tuple[Tensor, ...], __: Tensor) -> None:
            sq[name] += inp[0].detach().reshape(-1, inp[0].shape[-1]).double().pow(2).sum(0).cpu()
        return f

    handles = [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]
    try:
        device = next(model.parameters()).device
        for i in range(0, len(windows), batch_size):
            model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: v.sqrt().float() for n, v in sq.items()}


def choose(W: Tensor, spec: LayerSpec, h_diag: Tensor, inverse_cholesky: Callable[[], Tensor | None]) -> Tensor:
    """The keep-mask of a pruned layer from its spec (same count in every row, or n:m): scores |w| (magnitude),
    |w|·‖x_j‖ with ‖x_j‖ ∝ sqrt(H_jj) (wanda), or SparseGPT's OBS score w² / U_jj² (obs)."""
    how = spec.prune
    if how == "magnitude":
        score = W.abs()
    elif how == "wanda":
        score = W.abs() * h_diag.clamp_min(0).sqrt().unsqueeze(0)
    else:
        U = inverse_cholesky()
        score = W.pow(2) / (U.diagonal().pow(2).unsqueeze(0) if U is not None else 1.0)
    return mask_from_scores(score, spec.sparsity, spec.pattern, per_row=True)
