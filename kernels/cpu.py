"""CPU fast path for group-wise codes of width <= 4 and binary (PB-LLM) layers: a packed GEMV for decode,
PyTorch's int4 matmul for prefill.

Few rows of x (at most GEMV_ROWS, i.e. decode): `cpu_ext.wq_gemv`, our C++ GEMV (cpu_gemv.cpp) over the
layer's width parts (widths 2, 3, 4), which decodes the packed bit planes on the fly with AVX2 and
accumulates in fp32: memory-bound on the packed bytes, and as exact as the reference for fp32 inputs (up to
summation order), bf16 inputs only rounding the output. The extension is JIT-built on the first such call
(about a minute, once: the build is cached on disk; see cpu_ext.py). COMPRESS_CPU_GEMV=0 (read at a layer's
first decode call) keeps every call on the int4 path.

More rows (prefill), layers the GEMV does not cover (pruned ones) or no extension (no compiler or
ninja, failed build): PyTorch's int4 CPU matmul (tinygemm layout). tinygemm decodes w = (q − 8)·scale' + zero'
per group of g' columns. Our grid is w = (q − z)·s; with
codes shifted per group, q' = q − d, it is reproduced by scale' = s, zero' = (8 − z + d)·s for any integer d
keeping q' in [0, 15] (kernels.md §6 uses d = 0). We take d = z − 8 clamped to that range, so zero' = 0
whenever the codes allow it (always for widths ≤ 3): only the bf16 rounding of the scale remains, instead
of a bf16-rounded (8 − z)·s shared by every weight of the group. Mixed widths inside a layer lower too.
g' is the largest of {256, 128, 64, 32} dividing the layer's group width, preferring one that also divides K
(a scale is repeated over its g'-subgroups: 128-wide groups run as g' = 64 on K = 576); otherwise K is
padded to a multiple of g' (padded activations are zero). N is padded to a multiple of 16. A layer whose
group width is not a multiple of 32 (or a torch without the int4 kernel) runs every call through the GEMV.

The int4 kernel wants bf16 activations (fp32 ones are several times slower than a dense matmul), so the
dispatcher uses this path by default only for bf16 inputs; fp32 models keep the exact reference unless
COMPRESS_KERNEL=cpu asks for it. Memory: 4 bits per weight for the int4 copy (made at the first prefill),
whatever the width; the GEMV reads the checkpoint's own buffers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from compress.kernels import cpu_ext

GROUPS = (256, 128, 64, 32)
GEMV_ROWS = 8  # rows of x up to which linear() takes the packed GEMV (decode); more take the int4 matmul
GEMV_ENV = "COMPRESS_CPU_GEMV"  # "0" keeps every call on the int4 path


@dataclass
class Prepared:
    packed: Tensor  # uint8 [Np, Kp / 2], tinygemm's CPU int4 layout (N padded to a multiple of 16)
    scales_zeros: Tensor  # bf16 [Kp / g', Np, 2]: (scale', zero') per group of g' columns
    group: int  # g'
    K: int
    Kp: int
    N: int


def unsupported(layer: object) -> str | None:
    """Why this layer cannot take the CPU path (neither the int4 matmul nor the GEMV), or None when it can."""
    spec = layer.spec  # type: ignore[attr-defined]
    if spec.kind == "levels":
        return "per-column level grids (BAQ faithful mode) are not group-wise"
    if spec.kind == "binary":
        return binary_unsupported(layer)
    K = layer.in_features  # type: ignore[attr-defined]
    if max(spec.group_bits(K)) > 4:
        return "codes wider than 4 bits do not fit int4"
    why = int4_unsupported(layer)
    if why is None:
        return None
    gemv = gemv_unsupported(layer)  # may build the extension (once per process)
    return None if gemv is None else f"{why}, and {gemv}"


def int4_unsupported(layer: object) -> str | None:
    """Why the int4 matmul (tinygemm) cannot run this layer of width <= 4, or None."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu (needs >= 2.6)"
    spec, K = layer.spec, layer.in_features  # type: ignore[attr-defined]
    if not any(spec.group_width(K) % g == 0 for g in GROUPS):
        return f"group width {spec.group_width(K)} is not a multiple of 32"
    return None


def gemv_unsupported(layer: object) -> str | None:
    """Why the packed GEMV (cpu_ext) cannot run this layer, or None. Builds the extension on first use;
    the answer depends on the spec only, so it is kept on the layer."""
    cached = layer.__dict__.get("_cpu_gemv", False)
    if cached is not False:
        return cached
    spec = layer.spec  # type: ignore[attr-defined]
    if os.environ.get(GEMV_ENV, "").strip() == "0":
        why = f"{GEMV_ENV}=0"
    elif spec.kind != "affine":
        why = "the GEMV covers plain group-wise layers (not level grids, binary or pruned ones)"
    elif not set(spec.group_bits(layer.in_features)) <= set(cpu_ext.BITS):  # type: ignore[attr-defined]
        why = f"the GEMV covers widths {cpu_ext.BITS}"
    elif cpu_ext.load() is None:
        why = f"the CPU GEMV extension is unavailable ({cpu_ext.unavailable_reason()})"
    else:
        why = None
    layer.__dict__["_cpu_gemv"] = why
    return why


ROWS = 256  # rows converted at a time: the packer's layout is row-blocked (any multiple of 64 rows agrees)


def prepare(layer: object) -> Prepared:
    """The tinygemm copy of a CompressedLinear (done once, at the first CPU forward).

    Rows are shifted and converted ROWS at a time, so the int32 staging the packer needs stays below a
    megabyte instead of 4 bytes per weight of the layer (which fragmented the heap of a decoding process)."""
    spec, K = layer.spec, layer.in_features  # type: ignore[attr-defined]
    gw = spec.group_width(K)
    fits = [g for g in GROUPS if gw % g == 0]
    g = next((g for g in fits if K % g == 0), fits[0])  # a g' that also divides K needs no padding
    Kp = -(-K // g) * g
    codes = layer.codes()  # type: ignore[attr-defined]  # uint8 [N, K]
    N = codes.shape[0]
    Np = -(-N // 16) * 16  # the packer wants N % 16 == 0: padded rows are dropped from the output
    src = torch.arange(Kp // g) * g // gw  # the layer group of each tinygemm group
    s = F.pad(layer.scale.float()[:, src], (0, 0, 0, Np - N))  # type: ignore[attr-defined]  # [Np, G']
    z = F.pad(layer.zero_points()[:, src], (0, 0, 0, Np - N)).round().to(torch.int32)  # type: ignore[attr-defined]
    d = torch.empty_like(z)
    packed = torch.empty(Np, Kp // 2, dtype=torch.uint8)
    for r in range(0, Np, ROWS):
        zr = z[r : r + ROWS]
        q = zr.repeat_interleave(g, dim=1)  # [rows, Kp] int32; padding holds each group's zero (decodes to 0)
        n = min(N - r, len(zr))
        if n > 0:
            q[:n, :K] = codes[r : r + n]
        qg = q.view(len(zr), Kp // g, g)
        # Shift each group's codes by d so that tinygemm's zero' = (8 - z + d)·s vanishes where the codes allow
        # (always for widths <= 3): a large zero' would lose its low bits to bf16 in every weight of the group.
        d[r : r + ROWS] = (zr - 8).clamp(min=qg.amax(-1) - 15).minimum(qg.amin(-1))
        qg -= d[r : r + ROWS].unsqueeze(-1)
        packed[r : r + ROWS] = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([s.T, ((8 - z + d) * s).T], dim=-1).to(torch.bfloat16).contiguous()
    return Prepared(packed, sz, g, K, Kp, N)


def _gemv(layer: object, x: Tensor, bias: Tensor | None) -> Tensor:
    """x Ŵᵀ (+ bias) through the packed GEMV over the layer's width parts, in x's dtype; no autograd."""
    from compress.kernels import parts  # the dispatcher imports this module

    ps = parts(layer)
    if len(ps) == 1 and x.dtype in (torch.float32, torch.bfloat16):  # the decode path: one call, nothing else
        p = ps[0]
        return cpu_ext.wq_gemv(x, p.qweight, p.scale, p.zero, p.bits, p.group_size, bias)
    xf = x if x.dtype == torch.float32 else x.float()  # several widths: sum the parts in fp32, round once
    y = None
    for p in ps:
        xp = xf if p.cols is None else xf.index_select(-1, p.cols)
        yp = cpu_ext.wq_gemv(xp, p.qweight, p.scale, p.zero, p.bits, p.group_size, bias if y is None else None)
        y = yp if y is None else y.add_(yp)
    return y if y.dtype == x.dtype else y.to(x.dtype)


class _NoBackward(torch.autograd.Function):
    """The GEMV for an x that requires grad: the backward raises, as the int4 kernel's does."""

    @staticmethod
    def forward(ctx: object, x: Tensor, layer: object) -> Tensor:
        return _gemv(layer, x, None)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> None:
        raise RuntimeError("the packed CPU GEMV has no backward; run under torch.no_grad() or set "
                           "COMPRESS_KERNEL=reference for gradients through packed layers")


def gemv_linear(layer: object, x: Tensor) -> Tensor:
    """y = x Ŵᵀ + b through the packed GEMV (see _gemv), in x's dtype: fp32 accumulation, the bias added
    before the one rounding. With autograd on, a bias that requires grad is added outside the kernel (in
    fp32), and an x that requires grad gets a backward that raises."""
    bias = layer.bias  # type: ignore[attr-defined]
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        xf = x.float()  # the sum with the bias is rounded once, as in the kernel
        y = _NoBackward.apply(xf, layer) if x.requires_grad else _gemv(layer, xf, None)
        return (y if bias is None else y + bias.float()).to(x.dtype)
    return _gemv(layer, x, bias)


# --- binary (PB-LLM) layers ------------------------------------------------------------------------------
#
# mu + alpha·(2s − 1) = s'·(s − z') with s' = 2·alpha and z' = (alpha − mu) / (2·alpha): a 1-bit grid with fp32
# zero points, which the GEMV takes as they are (alpha = 0, a group whose binarized weights are all equal, is
# run as alpha = 1e-30: s'·(s − z') = mu + 1e-30·(2s − 1)). The salient weights are the CSR correction of
# kernels.binary_operands, added in fp32 before the one rounding: y[:, n] += Σ_j x[:, col_j]·delta_j
# (cpu_ext.csr_add_, 16-bit columns).
# Decode only (at most GEMV_ROWS rows of x); longer inputs dequantize the layer for that call.


@dataclass
class BinaryPrepared:
    signs: Tensor  # int32 [N, ceil(K/32)]: the sign plane (an MST-stored layer's, decoded once)
    scale: Tensor  # fp32 [N, G]: 2·alpha
    zero: Tensor  # fp32 [N, G]: (alpha − mu) / (2·alpha)
    group_size: int
    rowptr: Tensor  # int32 [N + 1]: the salient CSR
    col: Tensor  # int16 (read as uint16; int32 when K > 65536) [nnz]
    delta: Tensor  # fp32 [nnz]


def binary_unsupported(layer: object) -> str | None:
    if os.environ.get(GEMV_ENV, "").strip() == "0":
        return f"binary layers run on the CPU GEMV only, and {GEMV_ENV}=0"
    if cpu_ext.load() is None:
        return f"binary layers need the CPU GEMV extension, which is unavailable ({cpu_ext.unavailable_reason()})"
    return None


@functools.cache
def _malloc_trim() -> object | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def release_heap() -> None:
    """Give the heap's free pages back to the OS (glibc `malloc_trim`; a no-op elsewhere). Preparing a layer
    frees layer-sized temporaries between its small persistent buffers; glibc's raised mmap threshold keeps
    them on the heap, whose holes otherwise stay resident (SmolLM2 PB-LLM 10 %: +345 MB for 62 MB kept)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def prepare_binary(layer: object) -> BinaryPrepared:
    """The CPU form of a binary layer, made once: the affine 1-bit grid and the CSR with 16-bit columns
    (6 bytes a salient weight), from generic operands that are not kept."""
    from compress.kernels import binary_operands  # the dispatcher imports this module

    ops = binary_operands(layer, cache=False)  # only this form is kept: 6 instead of 8 bytes a salient weight
    alpha = ops.alpha.float().clamp_min(1e-30)
    col = ops.col.to(torch.int16) if layer.in_features <= 65536 else ops.col  # type: ignore[attr-defined]
    bp = BinaryPrepared(ops.signs, 2 * alpha, (alpha - ops.mu.float()) / (2 * alpha), ops.group_size, ops.rowptr,
                        col, ops.delta.float().contiguous())
    del ops
    release_heap()
    return bp


def binary_linear(layer: object, x: Tensor) -> Tensor:
    """y = x Ŵᵀ + b for a binary layer: the 1-bit GEMV plus the salient CSR correction, in x's dtype."""
    K, N = layer.in_features, layer.out_features  # type: ignore[attr-defined]
    bias = layer.bias  # type: ignore[attr-defined]
    if x.numel() > GEMV_ROWS * K:  # prefill: one dense decode of the layer for this call
        W = layer.dequantize()  # type: ignore[attr-defined]
        return F.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))
    bp: BinaryPrepared | None = layer.__dict__.get("_cpu_binary")
    if bp is None:
        bp = layer.__dict__["_cpu_binary"] = prepare_binary(layer)
    with torch.no_grad():
        xf = x.reshape(-1, K).float().contiguous()
        y = cpu_ext.wq_gemv(xf, bp.signs, bp.scale, bp.zero, 1, bp.group_size, None)  # fp32 [M, N]
        cpu_ext.csr_add_(y, xf, bp.rowptr, bp.col, bp.delta)
        if bias is not None:
            y += bias.float()
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError("the packed CPU GEMV has no backward; set COMPRESS_KERNEL=reference for gradients "
                           "through packed layers")
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


CpuPath = Literal["gemv", "int4", "binary", "dense"]


def path(layer: object, x: Tensor) -> CpuPath:
    """The kernel `linear(layer, x)` runs: "gemv" (the packed GEMV on the layer's own buffers, no int4 copy),
    "int4" (PyTorch's int4 matmul on the tinygemm copy, made by `prepare` at the first such call), "binary"
    (a binary layer's 1-bit GEMV plus the salient correction) or "dense" (a binary layer's prefill: one
    dequantize for the call). Depends on the layer, the rows of x and COMPRESS_CPU_GEMV (read at the layer's
    first call); it may build the GEMV extension, as the call would."""
    decode = x.numel() <= GEMV_ROWS * layer.in_features  # type: ignore[attr-defined]
    if layer.spec.kind == "binary":  # type: ignore[attr-defined]
        return "binary" if decode else "dense"
    if decode and gemv_unsupported(layer) is None:
        return "gemv"
    return "gemv" if int4_unsupported(layer) is not None else "int4"


def linear(layer: object, x: Tensor) -> Tensor:
    """y = x Ŵᵀ + b: the packed GEMV for at most GEMV_ROWS rows of x, else the int4 matmul (computed with bf16
    activations), returned in x's dtype. Layers the int4 matmul cannot take run every call on the GEMV;
    binary layers take `binary_linear`. `path` says which."""
    kind = path(layer, x)
    if kind in ("binary", "dense"):
        return binary_linear(layer, x)
    if kind == "gemv":
        return gemv_linear(layer, x)
    p: Prepared | None = getattr(layer, "_cpu_prepared", None)
    if p is None:
        p = prepare(layer)
        layer._cpu_prepared = p  # type: ignore[attr-defined]
    shape = x.shape
    x2 = x.reshape(-1, p.K)
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    if p.Kp != p.K:
        x2 = F.pad(x2, (0, p.Kp - p.K))
    y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), p.packed, p.group, p.scales_zeros)  # [M, Np]
    if y.shape[1] != p.N:
        y = y[:, : p.N]
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    y = y.reshape(*shape[:-1], p.N)
    bias = layer.bias  # type: ignore[attr-defined]
    return y if bias is None else y + bias.to(x.dtype)
