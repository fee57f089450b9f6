"""Kernel dispatch for `CompressedLinear`: CUDA → Triton → CPU int4 → reference.

Every backend implements y = x Ŵᵀ + b for a packed layer. The two packed ops are declared once in ops.py
(`torch.ops.compress.wq_matmul`, `torch.ops.compress.binary_matmul`); their meaning is reference.py (the
packing spec of compress/format.py as a function) and each fast backend is tested against it. A
backend is a pair of functions in `BACKENDS`: `unsupported(layer, x) -> reason | None` and
`linear(layer, x) -> y`. The first backend of the default order that supports the call runs it:

    x on a GPU:  cuda (batch-1 GEMV: widths 2-4 and binary + salient) → triton (widths 1-8, binary) → reference
    x on a CPU:  cpu (fp32, bf16, fp16: packed C++ GEMV for <= 8 rows; for more, the int4 matmul for bf16 and
                 a tiled C++ decode + fp32 matmul otherwise; a dense copy decoded once for kinds no kernel
                 covers) → reference (float64 inputs)

A default load never decodes a layer per call (the reference path) unless forced: fp32 prefills get the
reference's own Ŵ through the C++ decoder, fp32 decode steps the GEMV's fp32 accumulation. Set
COMPRESS_KERNEL=reference|cpu|triton|cuda to force one backend; a forced backend that cannot run a
call is an error naming why, never a silent fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from compress import format as fmt
from compress.errors import CompressError
from compress.kernels import cpu, reference

ENV = "COMPRESS_KERNEL"


@dataclass
class Part:
    """One width of a layer as a single-width packed matrix over its columns `cols` (None = all K)."""

    bits: int
    cols: Tensor | None
    qweight: Tensor  # int32 [N, ceil(K_w/32)·bits]
    scale: Tensor  # [N, G_w]
    zero: Tensor | None  # uint8 [N, G_w]; None = symmetric
    group_size: int


def parts(layer: Any) -> list[Part]:
    """The layer split by code width (a single part for uniform layers); cached on the module."""
    cached = getattr(layer, "_parts", None)
    if cached is not None and cached[0] is layer.qweight:
        return cached[1]
    spec, K = layer.spec, layer.in_features
    gw, gbits = spec.group_width(K), spec.group_bits(K)
    zero = None if spec.symmetric else layer.zero
    out, start = [], 0
    for w, cols in fmt.width_parts(spec, K):
        n = fmt.packed_words(len(cols), w)
        g = torch.tensor([i for i, b in enumerate(gbits) if b == w], device=layer.scale.device)
        whole = len(cols) == K
        out.append(Part(w, None if whole else cols.to(layer.qweight.device), layer.qweight[:, start : start + n],
                        layer.scale if whole else layer.scale[:, g],
                        None if zero is None else (zero if whole else zero[:, g]), gw))
        start += n
    layer._parts = (layer.qweight, out)
    return out


@dataclass
class BinaryOperands:
    """A binary layer in the kernels' form (reference.py, "binary + salient"): the sign plane, alpha and mu
    per group, and the salient weights as a CSR correction delta = W_salient − (mu + alpha·sign)."""

    signs: Tensor  # int32 [N, ceil(K/32)]
    alpha: Tensor  # [N, G]
    mu: Tensor  # [N, G]
    group_size: int
    rowptr: Tensor  # int32 [N + 1]
    col: Tensor  # int32 [nnz]
    delta: Tensor  # fp32 [nnz]

    def args(self) -> tuple[Tensor, Tensor, Tensor, int, Tensor, Tensor, Tensor]:
        return self.signs, self.alpha, self.mu, self.group_size, self.rowptr, self.col, self.delta


def binary_operands(layer: Any, *, cache: bool = True) -> BinaryOperands:
    """The kernel operands of a binary CompressedLinear, derived once from its buffers and cached on it unless
    `cache` is False (MST signs become a plain plane; the salient index, bitmask or CSR, becomes a CSR of
    corrections)."""
    cached = layer.__dict__.get("_binary")
    if cached is not None:
        return cached
    spec, N, K = layer.spec, layer.out_features, layer.in_features
    gw = spec.group_width(K)
    signs = fmt.pack(layer.codes(), 1) if layer.qweight.shape[1] == 0 else layer.qweight  # MST signs: a plane
    sal = layer.salient_part()
    dev = layer.qweight.device
    if sal is None:
        rowptr = torch.zeros(N + 1, dtype=torch.int32, device=dev)
        col, delta = torch.zeros(0, dtype=torch.int32, device=dev), torch.zeros(0, device=dev)
    else:
        rows, cols = torch.nonzero(sal.mask, as_tuple=True)  # row-major: ascending columns within a row
        sign = layer.codes()[rows, cols].float() * 2 - 1
        g = cols // gw
        binary = layer.mu.float()[rows, g] + layer.scale.float()[rows, g] * sign
        delta = sal.values()[rows, cols] - binary
        rowptr = torch.cat([rows.new_zeros(1), sal.mask.sum(1).cumsum(0)]).to(torch.int32)
        col = cols.to(torch.int32)
    ops = BinaryOperands(signs, layer.scale, layer.mu, gw, rowptr, col, delta)
    if cache:
        layer.__dict__["_binary"] = ops
    return ops


def _by_parts(op: Callable[..., Tensor], layer: Any, x: Tensor) -> Tensor:
    x2 = x.reshape(-1, layer.in_features)
    y = None
    for p in parts(layer):
        xp = x2 if p.cols is None else x2.index_select(1, p.cols)
        yp = op(xp.contiguous(), p.qweight, p.scale, p.zero, p.bits, p.group_size)
        y = yp if y is None else y + yp
    return _with_bias(layer, y.reshape(*x.shape[:-1], layer.out_features))


# --- backends -------------------------------------------------------------------------------------------

def _ref_unsupported(layer: Any, x: Tensor) -> str | None:
    return None


def _ref_linear(layer: Any, x: Tensor) -> Tensor:
    return F.linear(x, layer.dequantize().to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


def _cpu_unsupported(layer: Any, x: Tensor) -> str | None:
    if x.device.type != "cpu":
        return f"the input is on {x.device}, not the CPU"
    if x.dtype not in cpu.DTYPES:
        return f"the input is {x.dtype}; the CPU kernels take float32, bfloat16 and float16"
    return None  # every layer kind has a CPU path (cpu.path says which)


def _triton_unsupported(layer: Any, x: Tensor) -> str | None:
    try:
        from compress.kernels import triton_wq
    except ImportError as e:
        return f"triton is not importable ({e})"
    if not triton_wq.available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing to run Triton on the CPU)"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "the input is not on a CUDA device"
    if layer.spec.kind not in ("affine", "binary"):
        return f"{layer.spec.kind} layers have no Triton kernel yet"
    return None


def _triton_linear(layer: Any, x: Tensor) -> Tensor:
    from compress.kernels import triton_wq

    if layer.spec.kind == "binary":
        return _with_bias(layer, triton_wq.binary_matmul(x, *binary_operands(layer).args()))
    return _by_parts(triton_wq.wq_matmul, layer, x)


def _with_bias(layer: Any, y: Tensor) -> Tensor:
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


CUDA_BITS = (2, 3, 4)


def _cuda_unsupported(layer: Any, x: Tensor) -> str | None:
    if not x.is_cuda:
        return "the input is not on a CUDA device"
    if x.numel() // layer.in_features != 1:
        return "the CUDA kernel is a batch-1 GEMV"
    kind = layer.spec.kind
    if kind not in ("affine", "binary") or (kind == "affine" and any(p.bits not in CUDA_BITS for p in parts(layer))):
        return f"the CUDA GEMV covers group-wise widths {CUDA_BITS} and binary layers"
    from compress.kernels.cuda import build

    if build.load() is None:
        return "the CUDA extension did not build (nvcc missing or no GPU)"
    return None


def _cuda_linear(layer: Any, x: Tensor) -> Tensor:
    from compress.kernels.cuda import build

    if layer.spec.kind == "binary":
        return _with_bias(layer, build.binary_gemv(x, *binary_operands(layer).args()))
    return _by_parts(build.wq_gemv, layer, x)


BACKENDS: dict[str, tuple[Callable[[Any, Tensor], str | None], Callable[[Any, Tensor], Tensor]]] = {
    "cuda": (_cuda_unsupported, _cuda_linear),
    "triton": (_triton_unsupported, _triton_linear),
    "cpu": (_cpu_unsupported, cpu.linear),
    "reference": (_ref_unsupported, _ref_linear),
}


def choose(layer: Any, x: Tensor) -> str:
    """The backend that runs `layer(x)`: COMPRESS_KERNEL if set (and able), else the first able default.

    The answer depends only on the layer, x's device and dtype, and COMPRESS_KERNEL, so it is cached on the
    layer under that key: a decode step calls every Linear once per token and must not re-check specs."""
    forced = os.environ.get(ENV, "").strip().lower()
    key = (x.device, x.dtype, forced, x.numel() == x.shape[-1])
    cached = layer.__dict__.get("_backend")
    if cached is not None and cached[0] == key:
        return cached[1]
    if forced:
        if forced not in BACKENDS:
            raise CompressError(f"{ENV}={forced!r} is not a backend; choose one of {', '.join(BACKENDS)}")
        why = BACKENDS[forced][0](layer, x)
        if why is not None:
            raise CompressError(f"{ENV}={forced} cannot run this layer: {why}; unset {ENV} to let compress choose")
        name = forced
    else:
        order = ("cuda", "triton", "reference") if x.is_cuda else ("cpu", "reference")
        name = next(b for b in order if BACKENDS[b][0](layer, x) is None)
    layer.__dict__["_backend"] = (key, name)
    return name


def linear(layer: Any, x: Tensor) -> Tensor:
    """y = x Ŵᵀ + b for a CompressedLinear, through the chosen backend."""
    return BACKENDS[choose(layer, x)][1](layer, x)


__all__ = ["BACKENDS", "ENV", "BinaryOperands", "Part", "binary_operands", "choose", "linear", "parts", "reference"]
