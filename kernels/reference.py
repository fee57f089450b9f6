"""The normative low-bit matmul: unpack (format.py) -> dequantize (grid.py) -> dense matmul.

Every fast implementation (CPU lowering, Triton, CUDA) is tested against `wq_matmul` here, which is
nothing but the spec of `compress/format.py` written as a function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress import format as fmt
from compress import grid


def zeros_for(scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """The zero points [N, G] as fp32: stored uint8 (asymmetric) or 2**(bits-1) (symmetric, not stored)."""
    if zero is None:
        return torch.full(scale.shape, float(2 ** (bits - 1)), device=scale.device)
    return zero.float()


def dequantize(qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int, K: int) -> Tensor:
    """W_hat fp32 [N, K] of one single-width layer (or one width part of a mixed layer)."""
    codes = fmt.unpack(qweight, bits, K)
    return grid.dequantize_groups(codes, scale.float(), zeros_for(scale, zero, bits), group_size)


def wq_matmul(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int) -> Tensor:
    """y [M, N] = x [M, K] @ W_hatᵀ, computed in fp32 and returned in x's dtype.

    qweight int32 [N, ceil(K/32)·bits] (bit planes along K), scale [N, ceil(K/group_size)] (fp16/bf16/fp32),
    zero uint8 [N, G] or None for the symmetric grid (zero = 2**(bits-1)); group_size = K for per-row grids;
    the last group is narrower when group_size does not divide K.
    """
    K = x.shape[-1]
    W = dequantize(qweight, scale, zero, bits, group_size, K)
    return (x.float() @ W.T).to(x.dtype)


# --- binary + salient (PB-LLM) ---------------------------------------------------------------------------
#
# The kernel-side form of a binary layer (format.py, "Binary layers"): the sign plane, alpha and mu per
# group, and the salient weights as a CSR correction, delta = W_salient − (mu + alpha·sign) at each salient
# position, so a kernel runs the sign GEMV over every column and adds x[:, col]·delta row by row:
#   signs   int32 [N, ceil(K/32)]   1-bit plane (1 = +)
#   alpha   [N, G] fp16/bf16/fp32   mu [N, G] (same dtype)
#   rowptr  int32 [N + 1]           col int32 [nnz] (ascending within a row)   delta fp32 [nnz]
# The correction is derived from the checkpoint once per layer (`kernels.binary_operands`); nnz = 0 is a
# plain binary layer.


def binary_dequantize(signs: Tensor, alpha: Tensor, mu: Tensor, group_size: int, K: int, rowptr: Tensor,
                      col: Tensor, delta: Tensor) -> Tensor:
    """W_hat fp32 [N, K] = mu + alpha·(2·sign − 1), plus delta at the salient positions."""
    s = fmt.unpack(signs, 1, K).float() * 2 - 1
    W = grid.expand(mu.float(), group_size, K) + grid.expand(alpha.float(), group_size, K) * s
    if col.numel():
        rows = torch.repeat_interleave(torch.arange(W.shape[0], device=W.device), rowptr.long().diff())
        W[rows, col.long()] += delta.float()
    return W


def binary_matmul(x: Tensor, signs: Tensor, alpha: Tensor, mu: Tensor, group_size: int, rowptr: Tensor,
                  col: Tensor, delta: Tensor) -> Tensor:
    """y [M, N] = x [M, K] @ W_hatᵀ of a binary layer (fp32 compute, returned in x's dtype)."""
    W = binary_dequantize(signs, alpha, mu, group_size, x.shape[-1], rowptr, col, delta)
    return (x.float() @ W.T).to(x.dtype)
