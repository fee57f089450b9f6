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
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from compress.kernels import cpu_ext

log = logging.getLogger(__name__)

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
    """Why no packed CPU kernel covers this layer (it then runs on a dense copy decoded once, see `path`), or
    None when the GEMV or the int4 matmul does."""
    spec = layer.spec  # type: ignore[attr-defined]
    if spec.kind == "levels":
        return "per-column level grids (BAQ faithful mode) are not group-wise"
    if spec.kind == "ggml":
        return "ggml blocks run in llama.cpp; here they are decoded once"
    if spec.kind == "binary":
        return binary_unsupported(layer)
    K = layer.in_features  # type: ignore[attr-defined]
    int4 = "codes wider than 4 bits do not fit int4" if max(spec.group_bits(K)) > 4 else int4_unsupported(layer)
    if spec.kind == "pruned" or int4 is None:
        return int4
    gemv = gemv_unsupported(layer)  # may build the extension (once per process)
    return None if gemv is None else f"{int4}, and {gemv}"


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
# Decode-sized inputs; longer ones decode the 1-bit grid in tiles for one matmul (binary_tiles_linear).


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


def _binary_prepared(layer: object) -> BinaryPrepared:
    bp: BinaryPrepared | None = layer.__dict__.get("_cpu_binary")
    if bp is None:
        bp = layer.__dict__["_cpu_binary"] = prepare_binary(layer)
    return bp


def binary_linear(layer: object, x: Tensor) -> Tensor:
    """y = x Ŵᵀ + b for a binary layer: the 1-bit GEMV plus the salient CSR correction, in x's dtype."""
    K, N = layer.in_features, layer.out_features  # type: ignore[attr-defined]
    bias = layer.bias  # type: ignore[attr-defined]
    bp = _binary_prepared(layer)
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


CpuPath = Literal["gemv", "int4", "tiles", "binary", "binary-tiles", "decoded", "autograd"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE = 1 << 23  # weights decoded at a time by the tiles path (32 MB of fp32); a smaller layer is one tile
_told: set[str] = set()  # kinds already reported as running on a decoded copy


def _decode_rows(x: Tensor, layer: object) -> bool:
    """Whether this call is decode-sized (<= GEMV_ROWS rows of x) and may take a GEMV (which has no backward)."""
    grad = torch.is_grad_enabled() and x.requires_grad
    return not grad and x.numel() <= GEMV_ROWS * layer.in_features  # type: ignore[attr-defined]


def path(layer: object, x: Tensor) -> CpuPath:
    """The kernel `linear(layer, x)` runs, from the layer's kind, the rows and dtype of x, and what this
    machine built. Never the per-call reference decode:

      gemv          decode-sized x, group-wise codes: the packed GEMV on the layer's own buffers (widths 1-8)
      int4          bf16 prefill of widths <= 4: PyTorch's int4 matmul on the tinygemm copy (`prepare`, made once)
      tiles         other prefills of group-wise codes (fp32 / fp16 x, widths 5-8): the layer decoded by the C++
                    decoder (`cpu_ext.wq_dequant`, the reference's arithmetic bit for bit) in tiles of TILE
                    weights, each one fp32 matmul; for fp32 x exactly the reference's result
      binary        a binary layer, decode-sized x: the 1-bit GEMV plus the salient CSR correction
      binary-tiles  a binary layer's prefill: its 1-bit grid decoded by tiles, one matmul, the CSR correction
      decoded       what no kernel covers here (per-column level grids; pruned layers outside the int4 path; no
                    C++ extension): the layer decoded once to a dense copy in x's dtype, kept (logged once a kind)
      autograd      a layer whose own tensors are being trained (scale distillation): the reference decode, the
                    only path that carries gradients to them

    It may build the GEMV extension (once per process), as the call would. COMPRESS_CPU_GEMV=0 keeps group-wise
    layers off the GEMV (tests of the int4 path)."""
    kind = layer.spec.kind  # type: ignore[attr-defined]
    if torch.is_grad_enabled() and any(t.requires_grad for t in layer.packed().values()):  # type: ignore[attr-defined]
        return "autograd"
    decode = _decode_rows(x, layer)
    if kind == "binary":
        if binary_unsupported(layer) is not None:
            return "decoded"
        return "binary" if decode else "binary-tiles"
    if kind in ("levels", "ggml"):
        return "decoded"
    narrow = max(layer.spec.group_bits(layer.in_features)) <= 4  # type: ignore[attr-defined]
    int4 = narrow and int4_unsupported(layer) is None
    if kind == "pruned":
        return "int4" if int4 and x.dtype == torch.bfloat16 else "decoded"
    gemv = gemv_unsupported(layer) is None
    if decode and gemv:
        return "gemv"
    if int4 and (x.dtype == torch.bfloat16 or not gemv):
        return "int4"
    return "tiles" if gemv else "decoded"


def _tiled(xf: Tensor, N: int, decode: Callable[[int, int], Tensor], bias: Tensor | None) -> Tensor:
    """xf [M, K] fp32 @ Ŵᵀ + bias -> fp32 [M, N], with decode(n0, n1) giving rows [n0, n1) of Ŵ (fp32) and at
    most TILE weights decoded at a time. One tile is one F.linear, the reference's own operation."""
    rows = max(1, min(N, TILE // max(xf.shape[1], 1)))
    if rows >= N:
        return F.linear(xf, decode(0, N), bias)
    y = torch.empty(xf.shape[0], N)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        y[:, n0:n1] = F.linear(xf, decode(n0, n1), None if bias is None else bias[n0:n1])
    return y


def tiles_linear(layer: object, x: Tensor) -> Tensor:
    """y = x Ŵᵀ + b for a group-wise layer, Ŵ decoded by cpu_ext.wq_dequant in tiles, computed in fp32 and
    returned in x's dtype (fp32 x of a one-tile layer: exactly the reference's result). Gradients flow to x and
    the bias, as through the reference."""
    from compress.kernels import parts  # the dispatcher imports this module

    N, K = layer.out_features, layer.in_features  # type: ignore[attr-defined]
    ps = parts(layer)

    def decode(n0: int, n1: int) -> Tensor:
        def part(p: object) -> Tensor:
            zero = None if p.zero is None else p.zero[n0:n1]  # type: ignore[attr-defined]
            return cpu_ext.wq_dequant(p.qweight[n0:n1], p.scale[n0:n1], zero, p.bits, p.group_size,  # type: ignore[attr-defined]
                                      K if p.cols is None else len(p.cols))  # type: ignore[attr-defined]

        if len(ps) == 1:
            return part(ps[0])
        W = torch.empty(n1 - n0, K)
        for p in ps:  # a mixed layer: each width decodes its own columns
            W[:, p.cols] = part(p)
        return W

    bias = layer.bias  # type: ignore[attr-defined]
    xf = x.reshape(-1, K).float()
    y = _tiled(xf, N, decode, None if bias is None else bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def binary_tiles_linear(layer: object, x: Tensor) -> Tensor:
    """A binary layer's prefill: the 1-bit grid decoded in tiles, one fp32 matmul, plus the salient correction."""
    K, N = layer.in_features, layer.out_features  # type: ignore[attr-defined]
    bias = layer.bias  # type: ignore[attr-defined]
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError("the packed CPU path of binary layers has no backward; set COMPRESS_KERNEL=reference "
                           "for gradients through packed layers")
    bp = _binary_prepared(layer)
    xf = x.reshape(-1, K).float().contiguous()
    with torch.no_grad():
        y = _tiled(xf, N, lambda n0, n1: cpu_ext.wq_dequant(bp.signs[n0:n1], bp.scale[n0:n1], bp.zero[n0:n1], 1,
                                                            bp.group_size, K), None)
        cpu_ext.csr_add_(y, xf, bp.rowptr, bp.col, bp.delta)
        if bias is not None:
            y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def decoded_linear(layer: object, x: Tensor) -> Tensor:
    """y = x Ŵᵀ + b on a dense copy of Ŵ in x's dtype, decoded once and kept on the layer (dropped when its
    buffers change). Costs the dense layer's memory: for kinds no kernel covers here."""
    kind = layer.spec.kind  # type: ignore[attr-defined]
    W = layer.__dict__.get("_dense")
    if W is None or W.dtype != x.dtype:
        if kind not in _told:
            _told.add(kind)
            log.info("%s layers have no packed CPU kernel here (%s): each is decoded once to a dense %s copy "
                     "(COMPRESS_KERNEL=reference decodes per call instead)", kind, unsupported(layer), x.dtype)
        with torch.no_grad():
            W = layer.__dict__["_dense"] = layer.dequantize().to(x.dtype)  # type: ignore[attr-defined]
    bias = layer.bias  # type: ignore[attr-defined]
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))


def int4_linear(layer: object, x: Tensor) -> Tensor:
    """y = x Ŵᵀ + b through PyTorch's int4 matmul (bf16 activations), returned in x's dtype."""
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


def gemv_or_cast(layer: object, x: Tensor) -> Tensor:
    """The GEMV for any float dtype of x (fp16 goes through fp32, which the GEMV takes)."""
    if x.dtype == torch.float16:
        return gemv_linear(layer, x.float()).to(torch.float16)
    return gemv_linear(layer, x)


def autograd_linear(layer: object, x: Tensor) -> Tensor:
    """The dispatcher's reference backend: Ŵ decoded from the layer's tensors on every call, so gradients reach
    them."""
    from compress.kernels import BACKENDS

    return BACKENDS["reference"][1](layer, x)


LINEARS = {"autograd": autograd_linear, "gemv": gemv_or_cast, "int4": int4_linear, "tiles": tiles_linear,
           "binary": binary_linear, "binary-tiles": binary_tiles_linear, "decoded": decoded_linear}


def linear(layer: object, x: Tensor) -> Tensor:
    """y = x Ŵᵀ + b in x's dtype through the path `path` names."""
    return LINEARS[path(layer, x)](layer, x)
