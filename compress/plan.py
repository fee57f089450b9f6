"""The central types: what to do to each Linear (`LayerSpec`, `Plan`) and one weight on its way
through the weight stages (`LayerWeight`).

Shapes follow one convention everywhere: a Linear's weight is W [N, K] = [out_features,
in_features]; groups run along K; a group size that does not divide K leaves a narrower last group
in every row (SmolLM2: K = 576 = 4.5 x 128, so the last g128 group is 64 wide).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Protocol

import torch
from torch import Tensor

from compress import codecs
from compress.errors import CompressError

SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                        "float32": torch.float32}


@dataclass(frozen=True)
class LayerSpec:
    """What to do to one Linear: its grid and the methods that produce its codes.

    bits:       code width 1..8, or one width per group along K (mixed precision inside the layer,
                e.g. BAQ's per-group allocation); stored as a list in config.json.
    group_size: columns (along K) sharing one scale/zero; -1 = one group per output row.
    symmetric:  symmetric grid (zero fixed at 2**(bits-1), not stored) or asymmetric (zero stored).
    scale_dtype: storage dtype of the scales ("float16", "bfloat16", "float32").
    levels:     per-column level counts M_j (BAQ's faithful mode, per-row grids only): column j of row n
                uses scale (xmax_n - xmin_n)/(M_j - 1) and is stored with ceil(log2 M_j) bits; M_j = 1
                means the column is zero and not stored. `bits` is then the nominal rate.
    binary:     PB-LLM partial binarization (bits = 1): w = μ + α·sign, with μ, α per group of group_size
                columns (-1: per row), except a `salient` fraction of the weights kept on a per-row 8-bit
                asymmetric grid. `nnz` (salient count) and `index` ("bitmask" or "csr", whichever is
                smaller) are set by the rounding, so a checkpoint's plan sizes every buffer.
    signs:      how a binary layer stores its sign bits: "" (a plain 1-bit plane) or "mst" (a spanning tree
                over the rows and each row's differences from its parent, format.py), with `edges` the
                number of stored difference positions; the rounding picks "mst" only when it is smaller.
    sparsity:   prune this fraction of every row before rounding (`pattern` "unstructured" or "n:m", e.g.
                "2:4"), chosen by `prune` ("magnitude" |w|, "wanda" |w|·‖x_j‖, "obs" w²/[chol H⁻¹]_jj²);
                pruned weights get the zero code (decode to exactly 0), GPTQ compensates for them, and only
                the kept codes are stored, with a bitmask (format.py).
    ggml:       a ggml block type ("q4_k", "q6_k", "q8_0", "iq4_nl", ...; compress/ggml.py): the layer is stored in
                ggml's own blocks along K, as a GGUF file holds it, and its grid is that type's (sub-block scales
                and mins on the type's integer grid under fp16 super-scales). `bits` is then the type's code width
                and `group_size` its sub-block, for reports; the type fixes both.
    """

    bits: int | tuple[int, ...] = 4
    group_size: int = 128
    symmetric: bool = False
    scale_dtype: str = "float16"
    levels: tuple[int, ...] | None = None
    binary: bool = False
    salient: float = 0.0
    nnz: int = -1
    index: str = ""
    signs: str = ""
    edges: int = 0
    sparsity: float = 0.0
    pattern: str = "unstructured"
    prune: str = "magnitude"
    ggml: str = ""

    def __post_init__(self) -> None:
        for name in ("bits", "levels"):  # lists from JSON / YAML
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        widths = self.bits if isinstance(self.bits, tuple) else (self.bits,)
        if not widths or not all(isinstance(b, int) and 1 <= b <= 8 for b in widths):
            raise CompressError(f"bits={self.bits} is not supported; use integers from 1 to 8")
        if self.group_size != -1 and self.group_size < 1:
            raise CompressError(f"group_size={self.group_size} is invalid; use a positive size or -1 (per row)")
        if self.scale_dtype not in SCALE_DTYPES:
            raise CompressError(f"scale_dtype={self.scale_dtype!r} is invalid; choose one of {list(SCALE_DTYPES)}")
        codec = codecs.of(self)
        for other in codecs.CODECS.values():  # another kind's fields must keep their defaults
            for name in () if other is codec else other.FIELDS:
                if getattr(self, name) != _DEFAULTS[name]:
                    raise CompressError(f"{FOREIGN[name]} (this layer is {self.kind})")
        codec.validate(self)

    @property
    def kind(self) -> str:
        """The storage kind ("affine", "levels", "binary", "pruned", "ggml"): the key of `compress.codecs.CODECS`."""
        return codecs.kind(self)

    @property
    def sparse(self) -> bool:
        return self.kind == "pruned"

    def kept(self, K: int) -> int:
        """Weights kept per row of a pruned layer (every row keeps the same number)."""
        return codecs.pruned.kept(self, K)

    def groups(self, K: int) -> int:
        """Number of groups along K (the last one may be narrower)."""
        return 1 if self.group_size == -1 else math.ceil(K / self.group_size)

    def group_width(self, K: int) -> int:
        return K if self.group_size == -1 else self.group_size

    def group_bits(self, K: int) -> list[int]:
        """The code width of each group along K."""
        G = self.groups(K)
        if isinstance(self.bits, int):
            return [self.bits] * G
        if len(self.bits) != G:
            raise CompressError(f"bits lists {len(self.bits)} widths but the layer has {G} groups of "
                                f"{self.group_size} along K={K}")
        return list(self.bits)

    def rate(self, K: int) -> float:
        """Idealised code bits per weight: mean log2 of the level counts (BAQ's "average rate")."""
        if self.levels is None:
            return float(self.column_bits(K).double().mean())
        return float(torch.tensor(self.levels, dtype=torch.float64).log2().mean())

    def column_bits(self, K: int) -> Tensor:
        """Code width of every column, int64 [K] (0 for a column with a single level: not stored)."""
        if self.levels is not None:
            if len(self.levels) != K:
                raise CompressError(f"levels lists {len(self.levels)} columns but the layer has K={K}")
            m = torch.tensor(self.levels, dtype=torch.float64, device="cpu")
            return torch.ceil(torch.log2(m)).to(torch.int64)
        gb = torch.tensor(self.group_bits(K), dtype=torch.int64, device="cpu")  # cpu even under a meta context
        return gb.repeat_interleave(self.group_width(K))[:K]

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def bits_per_weight(self, N: int, K: int) -> tuple[float, float]:
        """(code bits, code + scale + zero bits) per weight, counted as stored (the kind's codec)."""
        return codecs.of(self).bits(self, N, K)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> LayerSpec:
        d = {k: v for k, v in d.items() if k not in LEGACY}
        valid = {f.name for f in fields(cls)}
        unknown = set(d) - valid
        if unknown:
            raise CompressError(f"unknown layer-spec keys {sorted(unknown)}; valid keys are {sorted(valid)}")
        return cls(**d)


_DEFAULTS = {f.name: f.default for f in fields(LayerSpec)}
LEGACY = ("method",)  # keys of older checkpoints' plans that carry nothing (FORMAT_VERSION <= 3 wrote `method`)
FOREIGN = {  # what a field set on the wrong kind of layer means, and the fix
    "levels": "per-column levels are a grid of their own: not for binary layers",
    "binary": "binary layers have bits=1 and no per-column levels",
    "salient": "salient weights belong to binary layers; set binary: true (and bits: 1)",
    "nnz": "a salient count belongs to binary layers; set binary: true (and bits: 1)",
    "index": "a salient index belongs to binary layers; set binary: true (and bits: 1)",
    "signs": "MST sign storage belongs to binary layers; set binary: true (and bits: 1)",
    "edges": "MST sign storage belongs to binary layers; set binary: true (and bits: 1)",
    "sparsity": "pruning composes with uniform group-wise grids only (not binary, levels or mixed widths)",
    "pattern": "pruning composes with uniform group-wise grids only (not binary, levels or mixed widths)",
    "ggml": "a ggml block type is a grid of its own: not with binary, levels or pruning",
}


@dataclass
class Plan:
    """Ordered map from module name (e.g. "model.layers.0.self_attn.q_proj") to its `LayerSpec`.

    Written by the allocation stage, read by every later stage, saved in config.json and read back
    by the loader to rebuild the module skeleton.
    """

    layers: dict[str, LayerSpec] = field(default_factory=dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __getitem__(self, name: str) -> LayerSpec:
        return self.layers[name]

    @property
    def head(self) -> str | None:
        """The planned Linear outside the blocks (the output head, weights.lm_head), if any: a block's Linears
        have dotted names below the block list, the head is a top-level module."""
        return next((n for n in self.layers if "." not in n), None)

    def without(self, name: str | None) -> Plan:
        return Plan({n: s for n, s in self.layers.items() if n != name})

    def avg_bits(self, shapes: Mapping[str, tuple[int, int]]) -> tuple[float, float]:
        """Average (code bits, bits with scales/zeros) per weight over the planned Linears,
        weighted by element count. `shapes` maps name -> (N, K)."""
        numel = code = total = 0.0
        for name, spec in self.layers.items():
            N, K = shapes[name]
            c, t = spec.bits_per_weight(N, K)
            numel += N * K
            code += c * N * K
            total += t * N * K
        return (code / numel, total / numel) if numel else (0.0, 0.0)

    def to_json(self) -> dict[str, dict]:
        return {name: spec.to_dict() for name, spec in self.layers.items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Mapping]) -> Plan:
        return cls({name: LayerSpec.from_dict(spec) for name, spec in d.items()})


class SignTree(Protocol):
    """A spanning tree over the rows of a sign matrix (compress.mst.Tree): each row's parent (-1 at the root)
    and the columns where it differs from it (the root: its + columns)."""

    parent: Tensor
    diffs: list[Tensor]


@dataclass
class Salient:
    """PB-LLM's salient weights: kept on a per-row asymmetric 8-bit grid.

    mask: bool [N, K]; codes: uint8 [N, K] (meaningful where mask); scale, zero: fp32 [N, 1]."""

    mask: Tensor
    codes: Tensor
    scale: Tensor
    zero: Tensor

    def values(self) -> Tensor:
        """Decoded salient weights [N, K] (zero outside the mask)."""
        return (self.scale * (self.codes.float() - self.zero)) * self.mask

    def apply(self, W: Tensor) -> Tensor:
        return torch.where(self.mask, self.values(), W)


@dataclass
class LayerWeight:
    """One weight matrix moving through the weight stages.

    Binary layers (spec.binary): codes are the sign bits (1 = +), scale = α and zero = μ [N, G] (floats),
    `salient` the 8-bit part.

    W:     fp32 [N, K], the dense weight the stage starts from (never modified in place).
    codes: uint8 [N, K] in [0, 2**bits), filled by a rounding method.
    scale: fp32 [N, G], values exactly representable in spec.scale_dtype.
    zero:  fp32 [N, G] integer-valued in [0, 2**bits); for symmetric grids the constant 2**(bits-1).
           With per-column levels: scale = the row range xmax - xmin [N, 1] and zero = xmin [N, 1].
    loss:  fp32 [K], per-column loss of the rounding (GPTQ's OBQ estimate; RTN's with H if given).
    info:  scalar facts for reports (e.g. the damping that was finally used).

    Invariant once rounded: `dequantize()` equals what the packed checkpoint decodes to.
    """

    W: Tensor
    spec: LayerSpec
    codes: Tensor | None = None
    scale: Tensor | None = None
    zero: Tensor | None = None
    loss: Tensor | None = None
    info: dict[str, float] = field(default_factory=dict)
    salient: Salient | None = None
    keep: Tensor | None = None  # pruned layers: bool [N, K], True = kept (pruned weights hold the zero code)
    tree: SignTree | None = None  # binary layers with MST signs: the tree the rounding built (stored as is)

    def dequantize(self) -> Tensor:
        """Ŵ fp32 [N, K] from the codes and grid in memory (the codec's decode: what the checkpoint holds)."""
        if self.codes is None or self.scale is None or self.zero is None:
            raise ValueError("LayerWeight has not been rounded yet")
        d = codecs.Decoded(self.codes, self.scale, self.zero, self.salient, self.keep)
        return codecs.of(self.spec).dequantize(d, self.spec, self.W.shape[1])

    def rounded(self, **changes: object) -> LayerWeight:
        return replace(self, **changes)
