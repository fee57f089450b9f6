"""GPTQ (Frantar et al., ICLR 2023, Algorithm 1), faithful to IST-DASLab/gptq `fasterquant`.

For a Linear y = W x with W [N, K] and calibration Hessian H = 2/n Σ x xᵀ [K, K], GPTQ quantizes
the columns of W left to right (all rows at once) and after each column pushes its error onto the
columns not yet quantized, so that ‖W X - Ŵ X‖² grows as little as possible:

    U = upper Cholesky factor of (H + λI)⁻¹            λ = damp · mean(diag H)
    for column j:  q_j = quant(w_j)
                   e_j = (w_j - q_j) / U_jj             scaled error, [N]
                   W[:, j+1:] -= e_j ⊗ U[j, j+1:]       OBQ update through the Cholesky row
                   loss_j = ½ Σ_rows (w_j - q_j)² / U_jj²

The updates are applied lazily: inside a block of B columns eagerly, and to the columns after the
block with one GEMM (W[:, i2:] -= E · U[i1:i2, i2:]). Same result as eager updates, far fewer
memory passes:

    K columns:  |  block 1 (B)  |  block 2 (B)  |  block 3  | ...
                   ^ eager rank-1 updates inside; one GEMM onto everything to the right at the end

Groups (g columns sharing a scale/zero) are fitted when the loop reaches their first column, on W as
it stands at the start of the current block: every earlier block's update is in, this block's eager
updates are not (the reference's dynamic groups; with g = B = 128 the two coincide). Fitting instead on
the eagerly updated columns sounds more exact but measured worse: on SmolLM2 w2 g64 it raised the
summed layer loss by 11% and ppl from 2808 to 3339, because the error pushed into a group widens its
min-max range. Act-order processes columns by decreasing diag(H); its groups are then fixed up front
on the original layout ("static groups"), so the checkpoint needs no g_idx and kernels see plain
contiguous groups. Per-row grids are likewise fitted once on the original W, as in the reference.

A ggml block type (`LayerSpec.ggml`, the gguf-* recipes) is a frozen grid too: each sub-block's scale and min
are chosen first by the type's weighted search (weights diag H, llama.cpp's imatrix) and snapped to the type's
integer grid under fp16 super-scales (compress/ggml.py), then the sweep rounds every column to its nearest grid
point with the same error feedback, so llama.cpp reads our codes in its own blocks.

Worked example (1 row, 1-bit min-max grid {0, 1} fitted on w = [1, .6, .6], H couples columns 1 and 2
with correlation .9): RTN rounds both .6 up, error d = [0, -.4, -.4], loss ½ dᵀHd = .304. GPTQ rounds
column 1 up, then moves its error into column 2: w₂ ← .6 - .9·.4 = .24, which rounds down:
d = [0, -.4, .6], loss .044 (tests/round/test_gptq.py checks these numbers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from compress import ggml, grid, prune
from compress.codecs import ggml as ggml_codec
from compress.errors import CompressError
from compress.plan import LayerWeight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """GPTQ knobs; defaults are the reference's."""

    needs_hessian: ClassVar[bool] = True  # facts of the method, not recipe knobs
    needs_calibration: ClassVar[bool] = False  # (needs windows without a Hessian: a joint method)
    damp: float = 0.01  # λ = damp · mean(diag H)
    block_size: int = 128  # lazy-update block B
    act_order: bool = False  # process columns by decreasing diag(H), with static groups
    max_damp: float = 10.0  # escalate λ ×10 on a failed Cholesky up to this, then fall back to RTN
    clip: bool = False  # search each group's range (grid.clip, weights diag H); keep it where GPTQ's loss is lower
    asymmetric: float = 0.0  # GPTAQ's α: round toward the dense model's outputs (`toward_dense`); 0 = plain GPTQ

    def __post_init__(self) -> None:
        if not 0 <= self.damp <= self.max_damp:
            raise CompressError(f"gptq damp={self.damp} is invalid; use a value in [0, max_damp={self.max_damp}]")
        if not 0 <= self.asymmetric <= 1:
            raise CompressError(f"gptq asymmetric={self.asymmetric} is invalid; use a value in [0, 1] (0.25 is "
                                "GPTAQ's reference, 0 turns it off)")
        if self.block_size < 1:
            raise CompressError(f"gptq block_size={self.block_size} is invalid; use a positive integer (128)")


def inverse_cholesky(H: Tensor, damp: float, max_damp: float, diag: Tensor | None = None,
                     perm: Tensor | None = None) -> tuple[Tensor | None, float]:
    """Upper Cholesky factor U of (H' + λI)⁻¹, escalating damp ×10 until both factorisations succeed. H' is H with
    its rows and columns in `perm` order (default: as given) and its diagonal replaced by `diag` (in that order;
    default: H's own). H is only read: the one [K, K] copy made is damped, factorised and then overwritten by the
    inverse, so at most three [K, K] matrices are alive at once, H included (the 13B down_proj's are 0.76 GB each).

    Returns (U, damp used), or (None, damp) when even max_damp fails (the caller falls back to RTN).
    """
    diag = torch.diag(H) if diag is None else diag
    mean_diag = diag.mean()
    while True:
        damped = H.clone() if perm is None else H[perm[:, None], perm]
        damped.diagonal().copy_(diag).add_(damp * mean_diag)  # H' + λI
        L, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            torch.cholesky_inverse(L, out=damped)  # (H' + λI)⁻¹, in the copy's memory
            del L
            U, info = torch.linalg.cholesky_ex(damped, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp
        del damped
        if damp >= max_damp:
            return None, damp
        damp = min(max(damp * 10, 1e-4), max_damp)


def toward_dense(W: Tensor, H: Tensor, D: Tensor, alpha: float, damp: float) -> Tensor:
    """GPTAQ's target (Li et al., ICML 2025, "asymmetric calibration"): the weights whose outputs on the quantized
    model's inputs X best match the dense layer's outputs on the dense model's inputs X̃ = X + ΔX.

    Per row w [1, K]:  ‖q Xᵀ − w X̃ᵀ‖² = (q − w*) H (q − w*)ᵀ + const,   w* = w + w D H⁻¹,
    with H = 2/n Σ x xᵀ and D = 2/n Σ Δx xᵀ [K, K] (Δx = x̃ − x, same scaling). So GPTQ run on W* with the same H
    is the OBQ sweep of the asymmetric objective; the error the earlier blocks' quantization left in this layer's
    inputs is corrected here instead of reproduced. α scales the correction (1: the least-squares one; the
    reference uses 0.25, a shrinkage against fitting calibration noise); H is damped as the sweep damps it.
    W [N, K], H [K, K], D [K, K] -> W* [N, K] (float32).
    """
    damped = H.float().clone()
    damped.diagonal().add_(damp * torch.diag(H).float().mean())  # H + λI
    L, info = torch.linalg.cholesky_ex(damped)
    if info != 0:  # no usable inverse: the plain target (GPTQ's own escalation handles the sweep)
        return W.float()
    correction = torch.cholesky_solve((W.float() @ D.float()).T, L).T  # W D (H + λI)⁻¹  (H symmetric)
    return W.float() + alpha * correction


def sweep(WT: Tensor, U: Tensor, B: int, column: Callable[[int, Tensor, Tensor], Tensor]) -> Tensor:
    """The OBQ column sweep shared by every GPTQ-style method (GPTQ, PB-LLM's GPTQ-PB).

    WT [K, N] is Wᵀ in processing order (updated in place: lazily, at block ends); U [K, K] the upper
    Cholesky factor of H⁻¹ in the same order. `column(j, w, WT)` rounds column j, whose current value
    (with every earlier error pushed in) is w [N], and returns its decoded value [N]; WT is passed for
    methods that fit parameters on the block-start state. Returns the scaled errors ErrT [K, N].
    """
    K = WT.shape[0]
    ErrT = torch.zeros_like(WT)
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = WT[i1:i2].clone()  # [B, N], receives the eager in-block updates
        U1 = U[i1:i2, i1:i2]
        diag = U1.diagonal().tolist()
        for i in range(i2 - i1):
            j = i1 + i
            w = W1[i]
            err = (w - column(j, w, WT)) / diag[i]  # scaled error, [N]
            ErrT[j] = err
            W1[i:].addr_(U1[i, i:], err, alpha=-1)  # OBQ update of the rest of the block
        WT[i2:].addmm_(U[i1:i2, i2:].T, ErrT[i1:i2], alpha=-1)  # lazy update of everything after it
    return ErrT


def apply(lw: LayerWeight, H: Tensor | None, cfg: Config, D: Tensor | None = None) -> LayerWeight:
    """Quantize lw.W [N, K] with GPTQ on Hessian H [K, K]; returns codes, grid and per-column loss. With `clip`, the
    sweep runs on the min-max grids and on the clipped ones, and the layer keeps the lower loss (never worse).
    With `asymmetric` and D (the dense-minus-quantized input cross term, `toward_dense`), it rounds GPTAQ's target
    instead of W; the loss is then the asymmetric objective's (up to a constant)."""
    if D is not None and cfg.asymmetric > 0 and H is not None:
        lw = replace(lw, W=toward_dense(lw.W, H, D, cfg.asymmetric, cfg.damp))
    if cfg.clip and lw.spec.kind in ("affine", "pruned") and H is not None:
        plain = _apply(lw, H, cfg, search=False)
        clipped = _apply(lw, H, cfg, search=True)
        best = clipped if clipped.info["loss"] < plain.info["loss"] else plain
        best.info["clipped"] = float(best is clipped)
        return best
    return _apply(lw, H, cfg, search=False)


def _apply(lw: LayerWeight, H: Tensor | None, cfg: Config, search: bool) -> LayerWeight:
    if H is None:
        raise CompressError("gptq needs calibration data (a Hessian); use method 'rtn' for data-free rounding")
    if not torch.isfinite(H).all():
        raise CompressError("the calibration Hessian holds NaN/inf (the model produced non-finite activations); "
                            "load the model in float32 or use other calibration data")
    if lw.spec.kind == "binary":
        raise CompressError("binary layers are rounded by round.method=pbllm (PB-LLM), not gptq")
    spec = lw.spec
    W = lw.W.float().clone()  # [N, K]
    N, K = W.shape
    H = H.float()  # [K, K], the caller's: only read (a copy of it is factorised), so it is not copied here
    sym, sdt = spec.symmetric, spec.torch_scale_dtype
    gs = spec.group_width(K)
    G = grid.n_groups(K, gs)
    gbits = spec.group_bits(K)  # width of each group (one value unless the plan mixes widths)

    diag = torch.diag(H).clone()  # [K]
    dead = diag == 0  # inputs that were always zero: nothing to reconstruct
    diag[dead] = 1  # (their H row and column are zero: a unit diagonal keeps the factorisation defined)
    W[:, dead] = 0
    importance = diag if search else None  # (the clipping search's column weights)

    keep = None
    if spec.kind == "pruned":  # prune first (SparseGPT-style: the sweep compensates for the pruned weights)
        keep = prune.choose(W, spec, diag, lambda: inverse_cholesky(H, cfg.damp, cfg.max_damp, diag)[0])
    Wfit = W if keep is None else W * keep  # grids are fitted on what is kept

    typed = spec.kind == "ggml"  # a ggml type's grid: its own scale search, then frozen (no dynamic groups)
    static = cfg.act_order or spec.group_size == -1 or typed
    perm = torch.argsort(diag, descending=True) if cfg.act_order else None
    col = torch.arange(K, device=W.device) if perm is None else perm  # original index of the j-th column
    if typed:  # value = S·q − Z per column (Z an offset, not a code; iq4_nl: S·LEVELS[q])
        scale = ggml.choose(spec.ggml, Wfit, diag)  # block headers [N, B, P]
        zero = ggml_codec.no_zero(scale)
        S, Z = ggml.columns(spec.ggml, scale, K)  # [N, K]
    elif spec.kind == "levels":  # BAQ's faithful grid: the row's range, a level count per column
        levels = spec.levels or ()
        scale, zero = grid.choose_range(W, sdt)  # [N, 1] range and minimum
        S, Z = grid.levels_grid(scale, zero, levels)  # [N, K]
        col_qmax = [levels[c] - 1 for c in col.tolist()]
    elif static:
        scale, zero = grid.choose_qparams_groups(Wfit, gbits, gs, sym, sdt, importance, search)  # [N, G]
        S, Z = grid.expand(scale, gs, K), grid.expand(zero, gs, K)  # [N, K]
        col_qmax = [grid.maxq(gbits[c // gs]) for c in col.tolist()]
    else:  # dynamic groups: fitted as the loop reaches them
        scale, zero = torch.zeros(N, G, device=W.device), torch.zeros(N, G, device=W.device)
    if static:  # per-column grids in processing order, one contiguous row per column: [K, N]
        ST = S[:, col].T.contiguous()
        if not typed:
            ST = ST.where(ST > 0, torch.ones_like(ST))  # single-level columns: any scale, qmax 0 keeps code 0
        ZT = Z[:, col].T.contiguous()
        del S, Z  # (memory: each [N, K] float32)
    if perm is not None:
        W = W[:, perm]

    U, damp = inverse_cholesky(H, cfg.damp, cfg.max_damp, diag if perm is None else diag[perm], perm)
    H = Wfit = None  # (memory: only H's Cholesky factor and W's permuted copy are used from here on)
    info = {"damp": damp}
    if U is None:  # numerically hopeless: RTN is still a valid rounding, and we say so
        log.warning("Cholesky failed even with damp=%g; rounding this layer to nearest", damp)
        U, info["rtn_fallback"] = torch.eye(K, device=W.device), 1.0

    # The loop runs on Wᵀ [K, N] so that a column of W is a contiguous row.
    WT = W.T.contiguous()
    del W
    QT = torch.zeros_like(WT)
    KT = None if keep is None else keep[:, col].T.contiguous()  # [K, N] in processing order

    def column(j: int, w: Tensor, WT: Tensor) -> Tensor:
        if typed:
            q = QT[j] = ggml.nearest(spec.ggml, w, ST[j], ZT[j])
            return ggml.value(spec.ggml, q, ST[j], ZT[j])
        if static:
            s, z, qmax = ST[j], ZT[j], col_qmax[j]
        else:
            g = j // gs
            if j % gs == 0:  # fit on W as of the block start (reference behaviour)
                block = WT[j : j + gs].T if KT is None else (WT[j : j + gs] * KT[j : j + gs]).T
                scale[:, g], zero[:, g] = (grid.clip(block, gbits[g], sym, sdt, importance[j : j + gs]) if search
                                           else grid.choose_qparams(block, gbits[g], sym, sdt))
            s, z, qmax = scale[:, g], zero[:, g], grid.maxq(gbits[g])
        q = torch.round(w / s).add_(z).clamp_(0, qmax)
        if KT is not None:
            q = torch.where(KT[j], q, z)  # pruned: the zero code, which decodes to exactly 0
        QT[j] = q
        return s * (q - z)

    ErrT = sweep(WT, U, cfg.block_size, column)
    Q = QT.T
    Losses = ErrT.T**2 / 2  # (w - q)² / U_jj² / 2 per weight

    loss = Losses.sum(dim=0)  # [K] in processing order
    if perm is not None:
        inv = torch.argsort(perm)
        Q, loss = Q[:, inv], loss[inv]
    info["loss"] = float(loss.sum())
    if keep is not None:
        info["sparsity"] = float(1 - keep.float().mean())
    return lw.rounded(codes=Q.to(torch.uint8), scale=scale, zero=zero, loss=loss, info=info, keep=keep)
