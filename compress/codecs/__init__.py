"""One codec per storage kind: how a compressed Linear is stored, packed, decoded and counted.

    affine   scale · (code − zero) per group of columns, one width or one per group   (GPTQ, RTN, BAQ)
    levels   per-column level counts on the row's range                               (BAQ faithful)
    binary   μ + α·sign per group, an 8-bit salient part, signs plain or as an MST    (PB-LLM)
    pruned   affine over the kept weights of each row + a keep bitmask                (SparseGPT, Wanda)
    ggml     ggml's own blocks (Q4_K, Q6_K, Q8_0, IQ4_NL, ...), as a GGUF file holds them  (gguf-* recipes)

A spec's kind follows from its fields (`LayerSpec.kind`); config.json keeps the fields, so older
checkpoints read unchanged. Every module here has the functions of `base.Codec`; format.py holds the bit
layouts they are built from (bit planes, MST, salient index) and is the normative spec.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from compress.codecs import affine, binary, ggml, levels, pruned
from compress.codecs.base import Codec, Decoded, Shapes

if TYPE_CHECKING:
    from compress.plan import LayerSpec

CODECS: dict[str, ModuleType] = {"affine": affine, "levels": levels, "binary": binary, "pruned": pruned, "ggml": ggml}


def kind(spec: LayerSpec) -> str:
    """The storage kind of a spec: the one place that reads the kind-selecting fields."""
    if spec.ggml:
        return "ggml"
    if spec.binary:
        return "binary"
    if spec.levels is not None:
        return "levels"
    if spec.sparsity or spec.pattern != "unstructured":
        return "pruned"
    return "affine"


def of(spec: LayerSpec) -> ModuleType:
    """The codec module of a spec."""
    return CODECS[kind(spec)]


__all__ = ["CODECS", "Codec", "Decoded", "Shapes", "kind", "of"]
