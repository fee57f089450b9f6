"""PB-LLM partial binarization (Shang, Yuan, Wu, Yang, ICLR 2024; hahnyuan/PB-LLM `gptq_pb`), with GPTQ-PB.

A binary layer (`LayerSpec.binary`) keeps a `salient` fraction of its weights on a per-row asymmetric
8-bit grid and binarizes the rest:

    Ŵ = where(M, s8·(q8 − z8), μ + α·sign(w − μ))        M = salient mask, μ, α per group (or row)

1. Salience on the original W: |w| ("magnitude", the reference default) or w² / U_jj² ("hessian", the
   OBS score with U = chol_upper((H + λI)⁻¹), as SparseGPT and the reference compute it); the top
   `salient` fraction of each group of columns (the whole matrix for per-row layers) is salient.
2. The 8-bit grid: min-max over the whole row (salient and not), as the reference does.
3. μ = mean and α = mean |w − μ| of the *binarized* weights of each row/group (the reference also counts
   the salient positions, as zeros, which shrinks α; see methods-binprune.md §2.2); rounded to the
   storage dtype before use, so the checkpoint decodes exactly to what the sweep saw.
4. GPTQ-PB (`feedback: true`): the GPTQ column sweep (compress.round.gptq.sweep) with this per-entry
   quantizer, errors pushed onto later columns; `feedback: false` is the paper's "RTN" rows.

Sign bits are kept at salient positions too (unused), so the sign plane covers every column; with
`signs: auto` they are stored as an MST over the rows (compress/mst.py) when that is smaller. Layers that
are not binary in the plan are rounded by GPTQ with this config's damp/block_size/act_order, so a
recipe can binarize some Linears and quantize others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from compress import format as fmt
from compress import grid, mst
from compress.errors import CompressError
from compress.plan import LayerSpec, LayerWeight, Salient
from compress.recipe import require
from compress.round import gptq
from compress.round.loss import column_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    needs_hessian: ClassVar[bool] = True  # facts of the method, not recipe knobs
    needs_calibration: ClassVar[bool] = False  # (needs windows without a Hessian: a joint method)
    metric: str = "magnitude"  # magnitude (|w|) | hessian (w² / U_jj²)
    feedback: bool = True  # GPTQ-PB error feedback; false = no feedback (the paper's RTN rows)
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False  # for the Linears the plan quantizes instead of binarizing
    signs: str = "auto"  # auto: store the signs as an MST over the rows when that is smaller | plain

    def __post_init__(self) -> None:
        if self.metric not in ("magnitude", "hessian"):
            raise CompressError(f"pbllm metric={self.metric!r} is invalid; choose magnitude or hessian")
        if self.signs not in ("auto", "plain"):
            raise CompressError(f"pbllm signs={self.signs!r} is invalid; choose auto (MST when smaller) or plain")
        require("round", self, positive=("block_size",), non_negative=("damp",))


def mst_signs(S: Tensor, spec: LayerSpec, info: dict[str, float]) -> tuple[LayerSpec, mst.Tree | None]:
    """MST-compression of the sign rows S [N, K]: (the spec storing them as a tree, the tree) when that is
    smaller than the plain 1-bit plane (format.py), else (spec, None); `info` gets the tree's mean edge / K
    and whether it was stored."""
    N, K = S.shape
    tree = mst.build(S)
    edges = sum(len(d) for d in tree.diffs)
    info["mst_edge"] = float(tree.edge_distances().mean()) / K if N > 1 else 0.0
    info["mst"] = float(fmt.mst_bits(N, K, edges) < N * fmt.packed_words(K, 1) * 32)
    return (replace(spec, signs="mst", edges=edges), tree) if info["mst"] else (spec, None)


def salient_mask(score: Tensor, fraction: float, group: int) -> Tensor:
    """bool [N, K]: the top `fraction` of `score` within each group of `group` columns (ties by index)."""
    N, K = score.shape
    mask = torch.zeros(N, K, dtype=torch.bool, device=score.device)
    for c0 in range(0, K, group):
        block = score[:, c0 : c0 + group]
        k = round(fraction * block.numel())
        if k:
            idx = block.flatten().topk(k).indices
            sub = torch.zeros(block.numel(), dtype=torch.bool, device=score.device)
            sub[idx] = True
            mask[:, c0 : c0 + group] = sub.view(block.shape)
    return mask


def binary_params(W: Tensor, keep: Tensor, group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(μ, α) [N, G] over the entries `keep` (the binarized ones) of each row and group of columns, as
    representable in the storage dtype. A row/group with nothing to binarize gets μ = 0, α = 0."""
    K = W.shape[1]
    mus, alphas = [], []
    for c0 in range(0, K, group):
        w, m = W[:, c0 : c0 + group], keep[:, c0 : c0 + group].float()
        n = m.sum(1).clamp_min(1)
        mu = (w * m).sum(1) / n
        alpha = ((w - mu[:, None]).abs() * m).sum(1) / n
        mus.append(mu.to(dtype).float())
        alphas.append(alpha.to(dtype).float())
    return torch.stack(mus, 1), torch.stack(alphas, 1)


def apply(lw: LayerWeight, H: Tensor | None, cfg: Config) -> LayerWeight:
    """Binarize lw.W [N, K] with a salient 8-bit part (PB-LLM / GPTQ-PB); non-binary specs go to GPTQ."""
    spec = lw.spec
    if spec.kind != "binary":
        return gptq.apply(lw, H, gptq.Config(damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order))
    if H is None:
        raise CompressError("pbllm needs calibration data (a Hessian) for its salience and error feedback")
    if not torch.isfinite(H).all():
        raise CompressError("the calibration Hessian holds NaN/inf; load the model in float32 or use other data")
    W = lw.W.float().clone()  # [N, K]
    N, K = W.shape
    H = H.float().clone()
    sdt = spec.torch_scale_dtype
    gw = spec.group_width(K)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U, damp = gptq.inverse_cholesky(H, cfg.damp, 10.0)
    info: dict[str, float] = {"damp": damp}
    if U is None:
        log.warning("Cholesky failed even with damp=%g; binarizing this layer without feedback", damp)
        U, info["rtn_fallback"] = torch.eye(K, device=W.device), 1.0

    score = W.abs() if cfg.metric == "magnitude" else W.pow(2) / U.diagonal().pow(2)
    mask = salient_mask(score, spec.salient, gw)  # [N, K]
    s8, z8 = grid.choose_qparams(W, 8, False, sdt)  # [N] each: the row's 8-bit grid
    mu, alpha = binary_params(W, ~mask, gw, sdt)  # [N, G]

    MT = mask.T.contiguous()  # [K, N]: a column of W is a row of these
    MU, AL = grid.expand(mu, gw, K).T.contiguous(), grid.expand(alpha, gw, K).T.contiguous()
    SIGN = torch.zeros(K, N, dtype=torch.uint8, device=W.device)
    Q8 = torch.zeros(K, N, dtype=torch.uint8, device=W.device)

    def column(j: int, w: Tensor, _: Tensor) -> Tensor:
        up = w >= MU[j]  # sign(w - μ), 0 counted as +
        binary = MU[j] + AL[j] * (2 * up.float() - 1)
        q = torch.round(w / s8).add_(z8).clamp_(0, 255)
        SIGN[j], Q8[j] = up.to(torch.uint8), q.to(torch.uint8)
        return torch.where(MT[j], s8 * (q - z8), binary)

    WT = W.T.contiguous()
    if cfg.feedback:
        ErrT = gptq.sweep(WT, U, cfg.block_size, column)
        loss = (ErrT**2 / 2).sum(dim=1)  # [K]
    else:
        for j in range(K):
            column(j, WT[j], WT)
        loss = None
    nnz = int(mask.sum())
    spec = replace(spec, nnz=nnz, index=fmt.choose_index(N, K, nnz) if nnz else "")
    tree = None
    if cfg.signs == "auto":
        spec, tree = mst_signs(SIGN.T.bool().cpu(), spec, info)
    out = lw.rounded(
        spec=spec, tree=tree,
        codes=SIGN.T.contiguous(), scale=alpha, zero=mu, info=info,
        salient=Salient(mask, Q8.T.contiguous() * mask, s8[:, None], z8[:, None]) if nnz else None)
    if loss is None:
        loss = column_loss(lw.W.float(), out.dequantize(), H)
    out.loss = loss
    info["loss"] = float(loss.sum())
    info["salient"] = nnz / (N * K)
    return out
