"""ggml blocks: a layer stored exactly as a GGUF file holds it (compress/ggml.py has the block layouts).

    blocks  uint8 [N, K / block · type_size]   the row's ggml blocks, in order along K

In memory (`Decoded`, `LayerWeight`) the layer is its codes uint8 [N, K] (unsigned, 0..qmax of the type) and
the raw block header `params` fp32 [N, B, P] in `scale` (B blocks per row; per type: fp16 super-scales and the
integer sub-block scales and mins, compress/ggml.py); `zero` is an empty [N, B, 0] (the type's offsets follow
from the params). The decode is ggml's own, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from compress import ggml
from compress.codecs.base import Decoded, Shapes
from compress.errors import CompressError

if TYPE_CHECKING:
    from compress.plan import LayerSpec, LayerWeight

FIELDS: tuple[str, ...] = ("ggml",)


def validate(spec: LayerSpec) -> None:
    if spec.ggml not in ggml.TYPES:
        raise CompressError(f"ggml type {spec.ggml!r} is not supported; choose one of {', '.join(ggml.TYPES)}")
    t = ggml.TYPES[spec.ggml]
    if spec.bits != code_bits(spec.ggml) or spec.group_size != t.sub:
        raise CompressError(f"a {spec.ggml} layer has bits={code_bits(spec.ggml)} and group_size={t.sub} (the type "
                            f"fixes its grid); got bits={spec.bits}, group_size={spec.group_size}")


def code_bits(name: str) -> int:
    """The code width of a ggml type (q4_k: 4, q6_k: 6, iq4_nl: 4, q8_0: 8)."""
    return int(ggml.TYPES[name].qmax).bit_length()


def check_shape(spec: LayerSpec, K: int) -> None:
    if not ggml.fits(spec.ggml, K):
        raise CompressError(f"{spec.ggml} needs rows whose length is a multiple of {ggml.TYPES[spec.ggml].block}; "
                            f"this Linear has in_features={K} (llama.cpp uses {ggml.FALLBACK.get(spec.ggml, 'f16')} "
                            "there)")


def buffers(spec: LayerSpec, N: int, K: int) -> Shapes:
    check_shape(spec, K)
    t = ggml.TYPES[spec.ggml]
    return {"blocks": ((N, K // t.block * t.type_size), torch.uint8)}


def pack(lw: LayerWeight) -> dict[str, Tensor]:
    return {"blocks": ggml.pack(lw.spec.ggml, lw.codes, lw.scale)}


def no_zero(params: Tensor) -> Tensor:
    """The `zero` of a ggml layer: empty [N, B, 0] (the offsets follow from the params)."""
    return params.new_zeros(*params.shape[:2], 0)


def grid(t: Mapping[str, Tensor], spec: LayerSpec, N: int, K: int) -> tuple[Tensor, Tensor]:
    """(params [N, B, P], empty [N, B, 0]): the block headers."""
    _, params = ggml.unpack(spec.ggml, t["blocks"], K)
    return params, no_zero(params)


def unpack(t: Mapping[str, Tensor], spec: LayerSpec, N: int, K: int) -> Decoded:
    codes, params = ggml.unpack(spec.ggml, t["blocks"], K)
    return Decoded(codes, params, no_zero(params))


def dequantize(d: Decoded, spec: LayerSpec, K: int) -> Tensor:
    return ggml.dequantize(spec.ggml, d.codes, d.scale)


def bits(spec: LayerSpec, N: int, K: int) -> tuple[float, float]:
    """(code bits, all bits) per weight: the type's code width, and its bytes per block as llama.cpp counts them."""
    return float(code_bits(spec.ggml)), ggml.TYPES[spec.ggml].bpw


def saved_spec(spec: LayerSpec, t: Mapping[str, Tensor]) -> LayerSpec:
    return spec
