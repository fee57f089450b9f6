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
