"""What every codec shares: the decoded form of a packed layer, and the interface a codec module has.

A codec is one module per storage kind (affine groups, per-column levels, binary + salient, pruned) with
the functions of `Codec`. Everything that depends on how a kind is stored (which tensors, their shapes,
how they pack and decode, what they cost in bits, which specs are valid) lives in its codec and nowhere
else; `CompressedLinear`, `LayerWeight.dequantize`, bits accounting, spec validation and the kernels ask
the codec of a spec (`compress.codecs.of(spec)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from compress.plan import LayerSpec, LayerWeight, Salient

Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]  # buffer name -> (shape, storage dtype)


@dataclass
class Decoded:
    """A layer in memory, as `LayerWeight` holds it after rounding (fp32 grid values, uint8 codes).

    codes: uint8 [N, K]; scale, zero: fp32, their meaning per kind (affine: [N, G] scale and zero point;
    levels: the row range and minimum [N, 1]; binary: alpha and mu [N, G]); salient: PB-LLM's 8-bit part;
    keep: bool [N, K] of a pruned layer (True = kept)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    salient: Salient | None = None
    keep: Tensor | None = None


class Codec(Protocol):
    """The functions of a codec module (see compress/codecs/affine.py for the plainest one)."""

    FIELDS: tuple[str, ...]  # the LayerSpec fields only this kind may set (others must keep their defaults)

    def validate(self, spec: LayerSpec) -> None: ...
    def buffers(self, spec: LayerSpec, N: int, K: int) -> Shapes: ...
    def pack(self, lw: LayerWeight) -> dict[str, Tensor]: ...
    def grid(self, t: Mapping[str, Tensor], spec: LayerSpec, N: int, K: int) -> tuple[Tensor, Tensor]: ...
    def unpack(self, t: Mapping[str, Tensor], spec: LayerSpec, N: int, K: int) -> Decoded: ...
    def dequantize(self, d: Decoded, spec: LayerSpec, K: int) -> Tensor: ...
    def bits(self, spec: LayerSpec, N: int, K: int) -> tuple[float, float]: ...
    def saved_spec(self, spec: LayerSpec, t: Mapping[str, Tensor]) -> LayerSpec: ...
