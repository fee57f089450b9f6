"""The packed-weight ops, declared once with `torch.library`: their meaning is the reference (reference.py).

    compress::wq_matmul(x, qweight, scale, zero, bits, group_size) -> y        group-wise codes, 1..8 bits
    compress::binary_matmul(x, signs, alpha, mu, group_size, rowptr, col, delta) -> y   binary + salient CSR

`y [..., N] = x [..., K] @ Ŵᵀ` in x's dtype, Ŵ decoded as compress/format.py specifies. Each op has a fake
(meta) implementation, so it traces under torch.compile / torch.export and runs on meta tensors, and one
implementation per device type: on a CPU the reference; on a CUDA device the fastest kernel that takes the
call (the CUDA GEMV for one activation row at 2-4 bits or binary, else Triton). Every fast implementation
is tested against the CPU one. `CompressedLinear` reaches the same kernels through `compress.kernels.linear`,
which adds what a layer knows and an op does not: mixed widths, the CPU fast path, forced backends.

This file must not be imported with `from __future__ import annotations`: torch.library reads the
annotations to build the schema.
"""

import torch
from torch import Tensor

from compress.kernels import reference


@torch.library.custom_op("compress::wq_matmul", mutates_args=())
def wq_matmul(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int) -> Tensor:
    """x [..., K] @ Ŵᵀ for a packed group-wise layer (reference.wq_matmul); zero None = symmetric."""
    K = x.shape[-1]
    return reference.wq_matmul(x.reshape(-1, K), qweight, scale, zero, bits, group_size).reshape(
        *x.shape[:-1], qweight.shape[0])


@wq_matmul.register_fake
def _(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@wq_matmul.register_kernel("cuda")
def _(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int) -> Tensor:
    from compress.kernels.cuda import build

    if x.numel() == x.shape[-1] and bits in (2, 3, 4) and build.load() is not None:
        return build.wq_gemv(x, qweight, scale, zero, bits, group_size)
    from compress.kernels import triton_wq

    return triton_wq.wq_matmul(x, qweight, scale, zero, bits, group_size)


@torch.library.custom_op("compress::binary_matmul", mutates_args=())
def binary_matmul(x: Tensor, signs: Tensor, alpha: Tensor, mu: Tensor, group_size: int, rowptr: Tensor,
                  col: Tensor, delta: Tensor) -> Tensor:
    """x [..., K] @ Ŵᵀ for a binary layer with a salient CSR correction (reference.binary_matmul)."""
    K = x.shape[-1]
    return reference.binary_matmul(x.reshape(-1, K), signs, alpha, mu, group_size, rowptr, col, delta).reshape(
        *x.shape[:-1], signs.shape[0])


@binary_matmul.register_fake
def _(x: Tensor, signs: Tensor, alpha: Tensor, mu: Tensor, group_size: int, rowptr: Tensor, col: Tensor,
      delta: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], signs.shape[0])


@binary_matmul.register_kernel("cuda")
def _(x: Tensor, signs: Tensor, alpha: Tensor, mu: Tensor, group_size: int, rowptr: Tensor, col: Tensor,
      delta: Tensor) -> Tensor:
    from compress.kernels.cuda import build

    if x.numel() == x.shape[-1] and build.load() is not None:
        return build.binary_gemv(x, signs, alpha, mu, group_size, rowptr, col, delta)
    from compress.kernels import triton_wq

    return triton_wq.binary_matmul(x, signs, alpha, mu, group_size, rowptr, col, delta)


__all__ = ["binary_matmul", "wq_matmul"]
