"""Binary + salient (PB-LLM): W_hat[n, k] = mu[n, g] + alpha[n, g] * (2 * sign[n, k] - 1), except at the
salient positions, which hold W_hat = salient_scale[n] * (salient_q - salient_zero[n]) (a per-row 8-bit grid).

    qweight          int32 [N, ceil(K/32)]   sign bits (1 = +); empty [N, 0] when the signs are an MST
    scale            scale_dtype [N, G]      alpha
    mu               scale_dtype [N, G]
    mst_parent       int16 [N]               signs "mst": the tree over the rows (format.pack_mst)
    mst_rowptr       int32 [N + 1]
    mst_col          int16 [edges]
    salient_mask     int32 [N, ceil(K/32)]   nnz > 0, index "bitmask"
    salient_rowptr   int32 [N + 1]           nnz > 0, index "csr"
    salient_col      int16 [nnz]             nnz > 0, index "csr"
    salient_q        uint8 [nnz]
    salient_scale    scale_dtype [N, 1]
    salient_zero     uint8 [N, 1]

The rounding decides nnz, the index and the sign storage and records them in the spec (and, for MST
signs, hands over the tree it built as `LayerWeight.tree`), so a checkpoint's plan sizes every buffer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from compress import format as fmt
from compress import grid as grids
from compress.codecs.base import Decoded, Shapes
from compress.errors import CompressError

if TYPE_CHECKING:
    from compress.plan import LayerSpec, LayerWeight, Salient

FIELDS: tuple[str, ...] = ("binary", "salient", "nnz", "index", "signs", "edges")
MST = ("mst_parent", "mst_rowptr", "mst_col")
SALIENT = ("salient_mask", "salient_rowptr", "salient_col", "salient_q")


def validate(spec: LayerSpec) -> None:
    if spec.bits != 1:
        raise CompressError("binary layers have bits=1 and no per-column levels")
    if not 0.0 <= spec.salient < 1.0:
        raise CompressError(f"salient={spec.salient} must be a fraction in [0, 1)")
    if spec.index not in ("", "bitmask", "csr"):
        raise CompressError(f"index={spec.index!r} must be bitmask or csr")
    if spec.signs not in ("", "mst") or (spec.signs == "mst") != (spec.edges > 0):
        raise CompressError(f"signs={spec.signs!r}, edges={spec.edges}: signs is '' or 'mst' (with edges > 0)")


def index(spec: LayerSpec, N: int, K: int) -> str:
    """The salient index of the layer: the spec's, or the smaller one for its nnz."""
    return spec.index or fmt.choose_index(N, K, spec.nnz)


def buffers(spec: LayerSpec, N: int, K: int) -> Shapes:
    sdt = spec.torch_scale_dtype
    G = spec.groups(K)
    mst = spec.signs == "mst"
    out: Shapes = {"qweight": ((N, 0 if mst else fmt.packed_words(K, 1)), torch.int32),
                   "scale": ((N, G), sdt), "mu": ((N, G), sdt)}
    if mst:
        out |= {"mst_parent": ((N,), fmt.index_dtype(N)), "mst_rowptr": ((N + 1,), torch.int32),
                "mst_col": ((spec.edges,), fmt.index_dtype(K))}
    if spec.nnz > 0:
        if index(spec, N, K) == "bitmask":
            out["salient_mask"] = ((N, fmt.packed_words(K, 1)), torch.int32)
        else:
            out |= {"salient_rowptr": ((N + 1,), torch.int32), "salient_col": ((spec.nnz,), fmt.index_dtype(K))}
        out |= {"salient_q": ((spec.nnz,), torch.uint8), "salient_scale": ((N, 1), sdt),
                "salient_zero": ((N, 1), torch.uint8)}
    return out


def pack(lw: LayerWeight) -> dict[str, Tensor]:
    spec, (N, K) = lw.spec, lw.W.shape
    sdt = spec.torch_scale_dtype
    out = {"scale": lw.scale.to(sdt), "mu": lw.zero.to(sdt)}
    if spec.signs == "mst":
        if lw.tree is None:
            raise ValueError("a binary layer with MST signs needs the tree its rounding built (LayerWeight.tree)")
        out |= fmt.pack_mst(lw.tree.parent, lw.tree.diffs, K)
        out["qweight"] = torch.zeros(N, 0, dtype=torch.int32, device=lw.codes.device)
    else:
        out["qweight"] = fmt.pack(lw.codes, 1)
    if spec.nnz > 0:
        sal = lw.salient
        if sal is None or int(sal.mask.sum()) != spec.nnz:
            raise ValueError("a binary layer's salient part must hold spec.nnz weights")
        out |= fmt.pack_salient(sal.mask, sal.codes, index(spec, N, K))
        out |= {"salient_scale": sal.scale.to(sdt), "salient_zero": sal.zero.to(torch.uint8)}
    return out


def grid(t: Mapping[str, Tensor], spec: LayerSpec, N: int, K: int) -> tuple[Tensor, Tensor]:
    """(alpha, mu) fp32 [N, G]."""
    return t["scale"].float(), t["mu"].float()


def signs(t: Mapping[str, Tensor], spec: LayerSpec, K: int) -> Tensor:
    """The sign bits uint8 [N, K] (1 = +), from the plane or from the tree (a walk over the rows)."""
    if spec.signs == "mst":
        return fmt.unpack_mst({k: t[k] for k in MST}, K).to(torch.uint8)
    return fmt.unpack(t["qweight"], 1, K)


def salient_part(t: Mapping[str, Tensor], spec: LayerSpec, N: int, K: int) -> Salient | None:
    """PB-LLM's 8-bit part, decoded from its index (None when the layer has none)."""
    from compress.plan import Salient

    if spec.nnz <= 0:
        return None
    mask, codes = fmt.unpack_salient({k: t[k] for k in SALIENT if k in t}, index(spec, N, K), N, K)
    return Salient(mask, codes, t["salient_scale"].float(), t["salient_zero"].float())


def unpack(t: Mapping[str, Tensor], spec: LayerSpec, N: int, K: int) -> Decoded:
    alpha, mu = grid(t, spec, N, K)
    return Decoded(signs(t, spec, K), alpha, mu, salient_part(t, spec, N, K))


def dequantize(d: Decoded, spec: LayerSpec, K: int) -> Tensor:
    gw = spec.group_width(K)
    W = grids.expand(d.zero, gw, K) + grids.expand(d.scale, gw, K) * (2 * d.codes.float() - 1)
    return W if d.salient is None else d.salient.apply(W)


def bits(spec: LayerSpec, N: int, K: int) -> tuple[float, float]:
    """Code = signs + salient index + 8-bit salient values; the rest adds alpha, mu and the 8-bit grid."""
    mst = spec.signs == "mst"
    code = 0 if mst else N * fmt.packed_words(K, 1) * 32
    sbits = torch.finfo(spec.torch_scale_dtype).bits
    meta = 2 * N * spec.groups(K) * sbits  # alpha and mu per group
    if mst:
        code += fmt.mst_bits(N, K, spec.edges)
    nnz = max(spec.nnz, 0)
    if nnz:
        code += fmt.index_bits(index(spec, N, K), N, K, nnz) + 8 * nnz
        meta += N * (sbits + 8)  # the salient rows' 8-bit grid
    return code / (N * K), (code + meta) / (N * K)


def saved_spec(spec: LayerSpec, t: Mapping[str, Tensor]) -> LayerSpec:
    """The spec a saved layer was packed with: its salient size and index are decided by the rounding."""
    q = t.get("salient_q")
    if q is None:
        return replace(spec, nnz=0, index="")
    return replace(spec, nnz=q.numel(), index="csr" if "salient_rowptr" in t else "bitmask")
