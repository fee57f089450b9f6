"""llama.cpp's per-tensor type mixes: which ggml type each tensor of a GGUF gets under an ftype (Q4_K_M, ...).

`llama-quantize` does not give every tensor the ftype's type: the value projections and some ffn_down layers
get more bits, the output matrix gets Q6_K (Q8_0 when its rows do not fit 256-blocks), and a tensor whose
rows are not a multiple of a k-quant's 256 falls back to a 32-block type. These are its rules for the
mixes we write (src/llama-quant.cpp, `llama_tensor_get_type`), for dense decoders (no expert rules):

    ftype    base    attn_v                 ffn_down                  attn_output   output / tied embedding
    q2_k     q2_k    q4_k if gqa >= 4       q3_k                      q3_k          q6_k
                     else q3_k
    q3_k_s   q3_k    -                      -                         -             q6_k
    q3_k_m   q3_k    q5_k (i < 2) else q4_k q5_k (i < n/16) else q4_k q4_k          q6_k
    q3_k_l   q3_k    q5_k                   q5_k                      q5_k          q6_k
    q4_k_s   q4_k    q5_k (i < 4)           q5_k (i < n/8)            -             q6_k
    q4_k_m   q4_k    q6_k (more bits)       q6_k (more bits)          -             q6_k
    q5_k_s   q5_k    -                      -                         -             q6_k
    q5_k_m   q5_k    q6_k (more bits)       q6_k (more bits)          -             q6_k
    q6_k     q6_k    -                      -                         -             q6_k
    q4_0     q4_0    -                      q4_1 (i < n/8, imatrix)   -             q6_k
    q5_0     q5_0    -                      q5_1 (i < n/8, imatrix)   -             q6_k
    q4_1, q5_1, iq4_nl, q8_0: the base type everywhere (q8_0's output stays q8_0)

"more bits" is layer i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2. A 70B-class or 8-expert model has further
rules that we do not write (plans for such models are refused). Then the shape fallback
(`compress.ggml.FALLBACK`), and an output matrix whose rows do not fit its type's block becomes q8_0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from compress import ggml
from compress.errors import CompressError

# ftype -> (base type, llama.cpp's LLAMA_FTYPE value written as general.file_type)
FTYPES: dict[str, tuple[str, int]] = {
    "q4_0": ("q4_0", 2), "q4_1": ("q4_1", 3), "q8_0": ("q8_0", 7), "q5_0": ("q5_0", 8), "q5_1": ("q5_1", 9),
    "q2_k": ("q2_k", 10), "q3_k_s": ("q3_k", 11), "q3_k_m": ("q3_k", 12), "q3_k_l": ("q3_k", 13),
    "q4_k_s": ("q4_k", 14), "q4_k_m": ("q4_k", 15), "q5_k_s": ("q5_k", 16), "q5_k_m": ("q5_k", 17),
    "q6_k": ("q6_k", 18), "iq4_nl": ("iq4_nl", 25),
}
# transformers' model_type -> llama.cpp's architecture (the ones whose tensors and metadata we write)
ARCHS: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
CATEGORIES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class Shape:
    """What the rules look at beyond a tensor's name: the model's depth and grouped-query factor."""

    n_layer: int
    n_gqa: int = 1  # attention heads per key-value head
    has_imatrix: bool = True  # our rounding always sees calibration statistics (llama.cpp's imatrix case)


def gguf_arch(model_type: str) -> str:
    """llama.cpp's architecture name for a transformers model type, or a one-line refusal."""
    if model_type not in ARCHS:
        raise CompressError(f"GGUF: model type {model_type!r} has no llama.cpp architecture here yet (we write "
                            f"{', '.join(sorted(ARCHS))}); keep the compress checkpoint or use another --format")
    return ARCHS[model_type]


def gguf_name(name: str, arch: str, n_layer: int) -> str | None:
    """The GGUF tensor name of a transformers parameter ("model.layers.3.self_attn.v_proj.weight" ->
    "blk.3.attn_v.weight"), by the gguf package's own name map; None when llama.cpp has no such tensor."""
    import gguf

    kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return _name_map(kind, n_layer).get_name(name, try_suffixes=(".weight", ".bias"))


def _name_map(kind: object, n_layer: int) -> object:
    import gguf

    key = (kind, n_layer)
    if key not in _MAPS:
        _MAPS[key] = gguf.get_tensor_name_map(kind, n_layer)
    return _MAPS[key]


_MAPS: dict[tuple[object, int], object] = {}


def check_ftype(ftype: str) -> str:
    if ftype not in FTYPES:
        raise CompressError(f"ftype {ftype!r} is not a llama.cpp mix we write; choose one of {', '.join(FTYPES)}")
    return FTYPES[ftype][0]


def category(gguf_name: str) -> str:
    """The rules' category of a GGUF tensor name ("blk.3.attn_v.weight" -> "attn_v")."""
    if gguf_name.startswith("output."):
        return "output"
    if gguf_name.startswith("token_embd."):
        return "token_embd"
    m = re.match(r"blk\.\d+\.([a-z_]+)\.weight$", gguf_name)
    return m.group(1) if m and m.group(1) in CATEGORIES else "other"


def more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def layer_type(ftype: str, cat: str, i: int, shape: Shape) -> str:
    """The type of a block's Linear (category `cat`, layer i) before the shape fallback."""
    base, n = check_ftype(ftype), shape.n_layer
    if cat == "attn_v":
        rules = {"q2_k": "q4_k" if shape.n_gqa >= 4 else "q3_k", "q3_k_m": "q5_k" if i < 2 else "q4_k",
                 "q3_k_l": "q5_k", "q4_k_s": "q5_k" if i < 4 else base,
                 "q4_k_m": "q6_k" if more_bits(i, n) else base, "q5_k_m": "q6_k" if more_bits(i, n) else base}
        return rules.get(ftype, base)
    if cat == "ffn_down":
        rules = {"q2_k": "q3_k", "q3_k_m": "q5_k" if i < n // 16 else "q4_k", "q3_k_l": "q5_k",
                 "q4_k_m": "q6_k" if more_bits(i, n) else base, "q5_k_m": "q6_k" if more_bits(i, n) else base,
                 "q4_k_s": "q5_k" if i < n // 8 else base}
        if ftype in ("q4_0", "q5_0") and shape.has_imatrix and i < n // 8:
            return {"q4_0": "q4_1", "q5_0": "q5_1"}[ftype]
        return rules.get(ftype, base)
    if cat == "attn_output":
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(ftype, base)
    return base


def fitted(t: str, K: int) -> str:
    """The type llama.cpp writes for rows of length K: `t`, or its fallback when K is not a multiple of t's block
    (f16 when not even that fits)."""
    if ggml.fits(t, K):
        return t
    f = ggml.FALLBACK.get(t)
    return f if f is not None and ggml.fits(f, K) else "f16"


def output_type(ftype: str, K: int) -> str:
    """The output matrix's type (the token embedding's too when the two are tied)."""
    base = check_ftype(ftype)
    if not ggml.fits("q6_k", K) or base == "q8_0":
        return "q8_0" if ggml.fits("q8_0", K) else "f16"
    return "q6_k"


def embedding_type(ftype: str, K: int) -> str:
    """An untied token embedding's type: the base type, shape fallback applied."""
    return fitted(check_ftype(ftype), K)
