"""Per-column levels (BAQ's faithful mode): column j of row n has M_j levels on the row's range.

    s_nj = range_n / (M_j - 1),  z_nj = round(-xmin_n / s_nj),  W_hat[n, j] = s_nj * (code - z_nj)

Column j is stored with ceil(log2 M_j) bits (columns with M_j = 1 are zero and take none), as the
mixed-width parts of format.py:

    qweight  int32 [N, Σ_w ceil(K_w/32)·w]
    scale    scale_dtype [N, 1]   the row range xmax - xmin
    rmin     scale_dtype [N, 1]   the row minimum xmin
"""

from __future__ import annotations

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

FIELDS: tuple[str, ...] = ("levels",)


def validate(spec: LayerSpec) -> None:
    if spec.group_size != -1 or spec.symmetric or isinstance(spec.bits, tuple):
        raise CompressError("per-column levels need a per-row asymmetric grid (group_size=-1, symmetric=false)")
    if not all(1 <= m <= 256 for m in spec.levels or ()):
        raise CompressError("per-column level counts must lie in 1..256")


def buffers(spec: LayerSpec, N: int, K: int) -> Shapes:
    sdt = spec.torch_scale_dtype
    return {"qweight": ((N, affine.words(spec, K)), torch.int32), "scale": ((N, 1), sdt), "rmin": ((N, 1), sdt)}


def pack(lw: LayerWeight) -> dict[str, Tensor]:
    sdt = lw.spec.torch_scale_dtype
    return {"qweight": fmt.pack_layer(lw.codes, lw.spec), "scale": lw.scale.to(sdt), "rmin": lw.zero.to(sdt)}


def grid(t: Mapping[str, Tensor], spec: LayerSpec, N: int, K: int) -> tuple[Tensor, Tensor]:
    """(row range, row minimum) fp32 [N, 1]."""
    return t["scale"].float(), t["rmin"].float()


def unpack(t: Mapping[str, Tensor], spec: LayerSpec, N: int, K: int) -> Decoded:
    rng, rmin = grid(t, spec, N, K)
    return Decoded(fmt.unpack_layer(t["qweight"], spec, K), rng, rmin)


def dequantize(d: Decoded, spec: LayerSpec, K: int) -> Tensor:
    s, z = grids.levels_grid(d.scale, d.zero, spec.levels or ())
    return grids.dequantize(d.codes.float(), s, z)


def bits(spec: LayerSpec, N: int, K: int) -> tuple[float, float]:
    code = N * affine.words(spec, K) * 32
    meta = 2 * N * torch.finfo(spec.torch_scale_dtype).bits  # row range + row minimum
    return code / (N * K), (code + meta) / (N * K)


def saved_spec(spec: LayerSpec, t: Mapping[str, Tensor]) -> LayerSpec:
    return spec
