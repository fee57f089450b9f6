"""Pruned: an affine group-wise grid over the kept weights only; every row keeps the same number k.

    qweight    int32 [N, ceil(k/32)·b]   the kept codes of each row, in column order, bit planes
    keep_mask  int32 [N, ceil(K/32)]     1-bit plane, 1 = kept
    scale      scale_dtype [N, G]        as affine (indexed by the original column)
    zero       uint8 [N, G]              asymmetric grids only

A pruned weight decodes to exactly 0: its code is its group's zero point. Patterns: "unstructured" (the
`sparsity` fraction of each row) or "n:m" (n pruned in every m consecutive columns, e.g. 2:4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from compress import format as fmt
from compress import grid as grids
from compress.codecs import affine
from compress.codecs.base import Decoded, Shapes
from compress.errors import CompressError

if TYPE_CHECKING:
    from compress.plan import LayerSpec, LayerWeight

FIELDS: tuple[str, ...] = ("sparsity", "pattern")  # (`prune`, the mask score, is read only here)
PRUNE = ("magnitude", "wanda", "obs")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "n:m" -> (n pruned, m group)."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise CompressError(f"pattern={pattern!r} is invalid; use unstructured or n:m (e.g. 2:4)") from None
    if not 0 < n < m:
        raise CompressError(f"pattern={pattern!r} must prune n of every m with 0 < n < m")
    return n, m


def validate(spec: LayerSpec) -> None:
    nm = parse_pattern(spec.pattern)
    if nm is None and not 0 < spec.sparsity < 1:
        raise CompressError(f"sparsity={spec.sparsity} must be a fraction in (0, 1)")
    if nm is not None and spec.sparsity and abs(spec.sparsity - nm[0] / nm[1]) > 1e-9:
        raise CompressError(f"sparsity={spec.sparsity} contradicts pattern {spec.pattern}; drop one of them")
    if isinstance(spec.bits, tuple):
        raise CompressError("pruning composes with uniform group-wise grids only (not binary, levels or "
                            "mixed widths)")
    if spec.prune not in PRUNE:
        raise CompressError(f"prune={spec.prune!r} is invalid; choose magnitude, wanda or obs")


def kept(spec: LayerSpec, K: int) -> int:
    """Weights kept per row (every row keeps the same number)."""
    nm = parse_pattern(spec.pattern)
    if nm is not None:
        if K % nm[1]:
            raise CompressError(f"in_features={K} is not a multiple of {nm[1]} ({spec.pattern})")
        return K // nm[1] * (nm[1] - nm[0])
    return K - math.floor(spec.sparsity * K)


def words(spec: LayerSpec, K: int) -> int:
    return fmt.packed_words(kept(spec, K), spec.group_bits(K)[0])


def buffers(spec: LayerSpec, N: int, K: int) -> Shapes:
    return {"qweight": ((N, words(spec, K)), torch.int32), **affine.grid_shapes(spec, N, K),
            "keep_mask": ((N, fmt.packed_words(K, 1)), torch.int32)}


def pack(lw: LayerWeight) -> dict[str, Tensor]:
    if lw.keep is None:
        raise ValueError("a pruned layer needs its keep mask")
    qweight, keep_mask = fmt.pack_sparse(lw.codes, lw.keep, lw.spec)
    return {"qweight": qweight, "keep_mask": keep_mask, **affine.pack_grid(lw)}


grid = affine.grid


def unpack(t: Mapping[str, Tensor], spec: LayerSpec, N: int, K: int) -> Decoded:
    scale, zero = grid(t, spec, N, K)
    fill = grids.expand(zero, spec.group_width(K), K).round()  # pruned positions hold their group's zero code
    codes = fmt.unpack_sparse(t["qweight"], t["keep_mask"], spec, K, fill)
    return Decoded(codes, scale, zero, keep=fmt.unpack_keep(t["keep_mask"], K))


dequantize = affine.dequantize


def bits(spec: LayerSpec, N: int, K: int) -> tuple[float, float]:
    """Code = the kept codes + the keep mask."""
    code = N * (words(spec, K) + fmt.packed_words(K, 1)) * 32
    return code / (N * K), (code + affine.meta_bits(spec, N, K)) / (N * K)


def saved_spec(spec: LayerSpec, t: Mapping[str, Tensor]) -> LayerSpec:
    return spec
