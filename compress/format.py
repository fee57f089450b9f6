"""The on-disk spec of a compressed Linear (FORMAT_VERSION 3: every v1 and v2 checkpoint is a valid v3 one).
This file *is* the spec of the bit layouts; compress/codecs/ builds one codec per storage kind from them
(which tensors a kind stores, how they pack, decode and count), and kernels are tested against the codecs.

Per compressed Linear `<fqn>` with weight W [N, K], grid from its `LayerSpec` (bits b, group size g,
G = ceil(K / g) groups, g = K when per-row):

    <fqn>.qweight  int32 [N, ceil(K/32) * b]   codes, bit planes (below)
    <fqn>.scale    scale_dtype [N, G]          per-group scale
    <fqn>.zero     uint8 [N, G]                integer zero point, asymmetric grids only
                                               (symmetric: zero = 2**(b-1), not stored)
    <fqn>.bias     as the original Linear, when it has one

    W_hat[n, k] = scale[n, k // g] * (code[n, k] - zero[n, k // g])

Bit planes. A b-bit code is split into power-of-two planes, widest first, least significant bits
first: 1 = [1], 2 = [2], 3 = [2, 1], 4 = [4], 5 = [4, 1], 6 = [4, 2], 7 = [4, 2, 1], 8 = [8].
Plane j of width p holds bits [s_j, s_j + p) of every code, where s_j is the sum of the widths
before it (3-bit: code = lo2 | hi1 << 2). A plane packs 32/p codes per int32 word along K,
LSB-first: code k sits in word k // (32/p) at bit offset p * (k % (32/p)). Every plane covers K
padded with zero codes to a multiple of 32, so plane j occupies ceil(K/32) * p consecutive words of
each row and a row of qweight is planes[0] ++ planes[1] ++ ...: 32 codes take exactly b words.
Every access is power-of-two aligned, so one kernel body serves every width (kernels.md: bit planes
as in llama.cpp Q3_K and gemlite's W3).

Per-column levels (BAQ's faithful mode, `LayerSpec.levels`): column j has M_j levels and is stored with
ceil(log2 M_j) bits in the parts below (columns with M_j = 1 are zero and take no bits); `scale` holds
the row range xmax - xmin [N, 1] and `rmin` the row minimum xmin [N, 1], both in the scale dtype, and
W_hat[n, j] = s_nj * (code - z_nj) with s_nj = range_n / (M_j - 1), z_nj = round(-xmin_n / s_nj).

Mixed widths inside a layer (FORMAT_VERSION 2; a v1 checkpoint is a valid v2 one). When the plan gives
a layer one width per group (`LayerSpec.bits` is a list), the columns are partitioned by width: for
every width w present, in increasing order, the columns of the groups with width w (in their natural
order, K_w of them) are packed as above into ceil(K_w/32) * w words per row, and qweight is the
concatenation of these parts along the last dim. The partition follows from the plan, so nothing else
is stored; a layer with a single width is exactly the v1 layout.

Binary layers (PB-LLM, `LayerSpec.binary`; FORMAT_VERSION 3, older checkpoints are valid v3 ones).
W_hat[n, k] = mu[n, k // g] + alpha[n, k // g] * (2 * sign[n, k] - 1), except at salient positions,
where W_hat[n, k] = salient_scale[n] * (salient_q - salient_zero[n]):

    <fqn>.qweight          int32 [N, ceil(K/32)]   sign bits (1 = +), a 1-bit plane as above
    <fqn>.scale            scale_dtype [N, G]      alpha
    <fqn>.mu               scale_dtype [N, G]      mu
    salient part, when the plan's nnz > 0:
    <fqn>.salient_mask     int32 [N, ceil(K/32)]   (index "bitmask") salient positions as a 1-bit plane
    <fqn>.salient_rowptr   int32 [N + 1]           (index "csr") row offsets into the arrays below
    <fqn>.salient_col      int16 [nnz]             (index "csr") column of each salient weight (int32 if K > 32767)
    <fqn>.salient_q        uint8 [nnz]             8-bit codes, row-major order of the positions
    <fqn>.salient_scale    scale_dtype [N, 1]      per-row 8-bit grid (min-max over the whole row)
    <fqn>.salient_zero     uint8 [N, 1]

The rounding picks the smaller index (a bitmask costs 1 bit per weight, CSR 16 or 32 bits per salient
weight plus the row offsets) and records it with nnz in the plan. Sign bits at salient positions are
stored but unused, so a kernel can run the sign GEMV over every column and add a sparse correction.
Bits per weight are counted as stored: signs + index + 8-bit values (+ alpha, mu and the 8-bit grid).

MST sign storage (binary layers with `LayerSpec.signs == "mst"`; MST-compression, compress/mst.py). The
rows of the sign matrix form a tree (a minimum spanning tree of their Hamming graph); every row is stored
as the columns where it differs from its parent, the root as the columns of its + signs:

    <fqn>.qweight      int32 [N, 0]       empty: the signs live in the tree
    <fqn>.mst_parent   int16 [N]          parent row of each row, -1 at the root (int32 if N > 32767)
    <fqn>.mst_rowptr   int32 [N + 1]      row offsets into mst_col
    <fqn>.mst_col      int16 [edges]      differing columns of each row, ascending (int32 if K > 32767)

Decoding walks the tree from the root: sign[root] = 1 at its columns, sign[c] = sign[parent(c)] flipped at
c's columns. The rounding stores a layer this way only when these bits (16 N + 32 (N + 1) + 16 edges)
are fewer than the plain plane's; `edges` (in the plan) sizes mst_col.

Pruned layers (`LayerSpec.sparsity` / `pattern`; every row keeps the same number k of weights):
    <fqn>.qweight    int32 [N, ceil(k/32) * b]   the kept codes of each row, in column order, packed as above
    <fqn>.keep_mask  int32 [N, ceil(K/32)]       1-bit plane, 1 = kept
and scale/zero as for any group-wise layer (indexed by the original column). A pruned weight decodes to
exactly 0 (its code is the group's zero point). Bits per weight: b·k/K + 1 for the mask.

config.json's `quantization_config` carries the format version and the per-layer plan, so a checkpoint
is self-describing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from compress.plan import LayerSpec

FORMAT_VERSION = 3
QUANT_METHOD = "compress"

PLANES: dict[int, tuple[int, ...]] = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}


def packed_words(K: int, bits: int) -> int:
    """int32 words per row of qweight."""
    return math.ceil(K / 32) * bits


def _to_int32(words: Tensor) -> Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(codes: Tensor, bits: int) -> Tensor:
    """codes uint8 [N, K] in [0, 2**bits) -> qweight int32 [N, ceil(K/32) * bits]."""
    N, K = codes.shape
    Kp = math.ceil(K / 32) * 32
    c = torch.zeros(N, Kp, dtype=torch.int64, device=codes.device)
    c[:, :K] = codes.to(torch.int64)
    planes, shift = [], 0
    for p in PLANES[bits]:
        per_word = 32 // p
        v = ((c >> shift) & ((1 << p) - 1)).view(N, Kp // per_word, per_word)  # [N, words, per_word]
        offsets = torch.arange(per_word, device=codes.device, dtype=torch.int64) * p
        planes.append(_to_int32((v << offsets).sum(dim=-1)))
        shift += p
    return torch.cat(planes, dim=1)


def unpack(qweight: Tensor, bits: int, K: int) -> Tensor:
    """qweight int32 [N, ceil(K/32) * bits] -> codes uint8 [N, K]. Exact inverse of `pack`."""
    N = qweight.shape[0]
    Kp = math.ceil(K / 32) * 32
    codes = None
    start, shift = 0, 0
    for p in PLANES[bits]:
        per_word = 32 // p
        n_words = Kp // per_word
        plane = qweight[:, start : start + n_words]  # [N, words] int32
        offsets = torch.arange(0, 32, p, device=qweight.device, dtype=torch.int32)
        # int32 >> is arithmetic; the mask keeps only the p bits of this code, so the sign never leaks
        v = ((plane.unsqueeze(-1) >> offsets) & ((1 << p) - 1)).reshape(N, Kp)  # [N, Kp]
        codes = v << shift if codes is None else codes | (v << shift)
        start, shift = start + n_words, shift + p
    return codes[:, :K].to(torch.uint8)


def width_parts(spec: LayerSpec, K: int) -> list[tuple[int, Tensor]]:
    """[(width w, column indices with width w)] in increasing w > 0: the order of the parts in qweight.
    (Columns of width 0, single-level columns of BAQ's faithful mode, are not stored: their code is 0.)"""
    cb = spec.column_bits(K)
    return [(w, torch.nonzero(cb == w).flatten()) for w in sorted(set(cb.tolist())) if w > 0]


def pack_layer(codes: Tensor, spec: LayerSpec) -> Tensor:
    """codes uint8 [N, K] (column k in [0, 2**width(k))) -> qweight int32 [N, layer_words]."""
    K = codes.shape[1]
    parts = [pack(codes[:, cols.to(codes.device)], w) for w, cols in width_parts(spec, K)]
    return torch.cat(parts, dim=1) if parts else torch.zeros(codes.shape[0], 0, dtype=torch.int32)


def unpack_layer(qweight: Tensor, spec: LayerSpec, K: int) -> Tensor:
    """qweight int32 [N, layer_words] -> codes uint8 [N, K]. Exact inverse of `pack_layer`."""
    parts = width_parts(spec, K)
    if len(parts) == 1 and len(parts[0][1]) == K:
        return unpack(qweight, parts[0][0], K)
    codes = torch.zeros(qweight.shape[0], K, dtype=torch.uint8, device=qweight.device)
    start = 0
    for w, cols in parts:
        n = packed_words(len(cols), w)
        codes[:, cols.to(qweight.device)] = unpack(qweight[:, start : start + n], w, len(cols))
        start += n
    return codes


def pack_sparse(codes: Tensor, keep: Tensor, spec: LayerSpec) -> tuple[Tensor, Tensor]:
    """codes uint8 [N, K] + keep bool [N, K] (k per row) -> (qweight of the kept codes, keep_mask)."""
    N, K = codes.shape
    k = spec.kept(K)
    if not bool((keep.sum(dim=1) == k).all()):
        raise ValueError(f"every row of a pruned layer must keep exactly {k} weights")
    kept = codes[keep].view(N, k)  # row-major: each row's kept codes in column order
    return pack(kept, spec.group_bits(K)[0]), pack(keep.to(torch.uint8), 1)


def unpack_keep(keep_mask: Tensor, K: int) -> Tensor:
    """The keep-mask bool [N, K] of a pruned layer (True = kept) from its packed bitmask."""
    return unpack(keep_mask, 1, K).bool()


def unpack_sparse(qweight: Tensor, keep_mask: Tensor, spec: LayerSpec, K: int, fill: Tensor) -> Tensor:
    """Inverse of `pack_sparse`: codes uint8 [N, K], `fill` (the zero codes [N, K]) at pruned positions."""
    keep = unpack_keep(keep_mask, K)
    codes = fill.to(torch.uint8).clone()
    codes[keep] = unpack(qweight, spec.group_bits(K)[0], spec.kept(K)).flatten()
    return codes


def index_bits(index: str, N: int, K: int, nnz: int) -> int:
    """Storage bits of the salient positions in a layout ("bitmask" or "csr")."""
    if index == "bitmask":
        return N * packed_words(K, 1) * 32
    return 32 * (N + 1) + nnz * (16 if K <= 32767 else 32)


def choose_index(N: int, K: int, nnz: int) -> str:
    """The smaller salient index for nnz positions in an N x K matrix."""
    return "bitmask" if index_bits("bitmask", N, K, nnz) < index_bits("csr", N, K, nnz) else "csr"


def index_dtype(size: int) -> torch.dtype:
    """int16 for indices into a dimension of `size`, int32 beyond."""
    return torch.int16 if size <= 32767 else torch.int32


def mst_bits(N: int, K: int, edges: int) -> int:
    """Storage bits of a sign matrix in the MST layout (parents, row offsets, differing columns)."""
    return N * torch.iinfo(index_dtype(N)).bits + 32 * (N + 1) + edges * torch.iinfo(index_dtype(K)).bits


def pack_mst(parent: Tensor, diffs: list[Tensor], K: int) -> dict[str, Tensor]:
    """A rooted tree over N rows (parent int [N], -1 at the root) and each row's differing columns
    (the root: its + columns) -> the MST tensors (names without the layer prefix)."""
    counts = torch.tensor([len(d) for d in diffs], dtype=torch.int64)
    cols = torch.cat([d.sort().values for d in diffs]) if diffs else torch.zeros(0, dtype=torch.int64)
    return {"mst_parent": parent.to(index_dtype(len(parent))),
            "mst_rowptr": torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32),
            "mst_col": cols.to(index_dtype(K))}


def unpack_mst(t: dict[str, Tensor], K: int) -> Tensor:
    """Inverse of `pack_mst`: the sign matrix bool [N, K] (True = +), decoded from the root down."""
    parent = t["mst_parent"].long().cpu()
    rowptr, cols = t["mst_rowptr"].long().cpu().tolist(), t["mst_col"].long().cpu()
    N = len(parent)
    children: list[list[int]] = [[] for _ in range(N)]
    roots = []
    for c, p in enumerate(parent.tolist()):
        (roots if p < 0 else children[p]).append(c)
    if len(roots) != 1:
        raise ValueError(f"an MST sign layout needs exactly one root, found {len(roots)}")
    S = torch.zeros(N, K, dtype=torch.bool)
    stack, seen = [roots[0]], 0
    while stack:
        v = stack.pop()
        seen += 1
        p = int(parent[v])
        if p >= 0:
            S[v] = S[p]
        d = cols[rowptr[v] : rowptr[v + 1]]
        S[v, d] = ~S[v, d]
        stack.extend(children[v])
    if seen != N:
        raise ValueError("the MST parents do not form a tree (a cycle or a detached row)")
    return S.to(t["mst_col"].device)


def pack_salient(mask: Tensor, codes: Tensor, index: str) -> dict[str, Tensor]:
    """bool mask [N, K] + uint8 codes [N, K] -> the salient tensors of `index` (names without prefix)."""
    K = mask.shape[1]
    out = {"salient_q": codes[mask].to(torch.uint8)}
    if index == "bitmask":
        out["salient_mask"] = pack(mask.to(torch.uint8), 1)
    else:
        counts = mask.sum(dim=1).to(torch.int64)
        out["salient_rowptr"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        out["salient_col"] = torch.nonzero(mask)[:, 1].to(index_dtype(K))
    return out


def unpack_salient(t: dict[str, Tensor], index: str, N: int, K: int) -> tuple[Tensor, Tensor]:
    """Inverse of `pack_salient`: (mask bool [N, K], codes uint8 [N, K], zero outside the mask)."""
    device = t["salient_q"].device
    if index == "bitmask":
        mask = unpack(t["salient_mask"], 1, K).bool()
    else:
        rowptr = t["salient_rowptr"].long()
        rows = torch.repeat_interleave(torch.arange(N, device=device), rowptr[1:] - rowptr[:-1])
        mask = torch.zeros(N, K, dtype=torch.bool, device=device)
        mask[rows, t["salient_col"].long()] = True
    codes = torch.zeros(N, K, dtype=torch.uint8, device=device)
    codes[mask] = t["salient_q"]
    return mask, codes
