"""Affine groups: W_hat[n, k] = scale[n, g] * (code[n, k] - zero[n, g]), g = k // group_size.

The plainest kind and the one every serving format knows (GPTQ, compressed-tensors, GGUF's Q4_0 family).
Widths may differ between groups (`LayerSpec.bits` as a list, BAQ's per-group allocation): the columns are
then stored as one bit-plane part per width (format.py, "mixed widths").

    qweight  int32 [N, Σ_w ceil(K_w/32)·w]   codes, bit planes per width part (format.pack_layer)
    scale    scale_dtype [N, G]
    zero     uint8 [N, G]                     asymmetric grids only (symmetric: 2**(b-1), not stored)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from compress import format as fmt
from compress import grid as grids
from compress.codecs.base import Decoded, Shapes

if TYPE_CHECKING:
    from compress.plan import LayerSpec, LayerWeight

FIELDS: tuple[str, ...] = ()  # only the fields every kind has (bits, group_size, symmetric, scale_dtype)


def validate(spec: LayerSpec) -> None:
    """Nothing beyond the common checks: any width 1..8 per group, any group size."""


def words(spec: LayerSpec, K: int) -> int:
    """int32 words per row of qweight."""
    return sum(fmt.packed_words(len(cols), w) for w, cols in fmt.width_parts(spec, K))


def grid_shapes(spec: LayerSpec, N: int, K: int) -> Shapes:
    """scale (and zero when asymmetric) [N, G]: shared with the pruned kind."""
    G = spec.groups(K)
    out: Shapes = {"scale": ((N, G), spec.torch_scale_dtype)}
    if not spec.symmetric:
        out["zero"] = ((N, G), torch.uint8)
    return out


def buffers(spec: LayerSpec, N: int, K: int) -> Shapes:
    return {"qweight": ((N, words(spec, K)), torch.int32), **grid_shapes(spec, N, K)}


def pack_grid(lw: LayerWeight) -> dict[str, Tensor]:
    out = {"scale": lw.scale.to(lw.spec.torch_scale_dtype)}
    if not lw.spec.symmetric:
        out["zero"] = lw.zero.to(torch.uint8)
    return out


def pack(lw: LayerWeight) -> dict[str, Tensor]:
    return {"qweight": fmt.pack_layer(lw.codes, lw.spec), **pack_grid(lw)}


def grid(t: Mapping[str, Tensor], spec: LayerSpec, N: int, K: int) -> tuple[Tensor, Tensor]:
    """(scale, zero point) fp32 [N, G]; a symmetric grid's zero is 2**(bits-1) in every group."""
    scale = t["scale"]
    if spec.symmetric:
        gb = torch.tensor(spec.group_bits(K), device=scale.device)
        return scale.float(), (2.0 ** (gb - 1)).expand(N, -1)
    return scale.float(), t["zero"].float()


def unpack(t: Mapping[str, Tensor], spec: LayerSpec, N: int, K: int) -> Decoded:
    scale, zero = grid(t, spec, N, K)
    return Decoded(fmt.unpack_layer(t["qweight"], spec, K), scale, zero)


def dequantize(d: Decoded, spec: LayerSpec, K: int) -> Tensor:
    return grids.dequantize_groups(d.codes, d.scale, d.zero, spec.group_width(K))


def meta_bits(spec: LayerSpec, N: int, K: int) -> int:
    """Bits of the scales and zero points."""
    G = spec.groups(K)
    return N * G * (torch.finfo(spec.torch_scale_dtype).bits + (0 if spec.symmetric else 8))


def bits(spec: LayerSpec, N: int, K: int) -> tuple[float, float]:
    code = N * words(spec, K) * 32
    return code / (N * K), (code + meta_bits(spec, N, K)) / (N * K)


def saved_spec(spec: LayerSpec, t: Mapping[str, Tensor]) -> LayerSpec:
    return spec
