"""ggml's block formats (what a GGUF file stores): scale search, GPTQ's per-column grid, exact bytes, decode.

A row of K weights is cut into blocks of `block` consecutive values (32, or 256 for the k-quants); each block is
`type_size` bytes. Codes are unsigned here (0..qmax); where ggml stores a signed integer the zero point is named.
Multi-byte fields are little-endian, d/dmin/m are IEEE fp16; nib(a, b) is a byte with a in its low nibble and b
in its high one.

| type   | bytes | bpw    | layout (byte offset: field)                                          | value             |
|--------|-------|--------|----------------------------------------------------------------------|-------------------|
| q4_0   | 18    | 4.5    | 0: d; 2: qs[16], qs[j] = nib(q[j], q[j+16])                          | d·(q − 8)         |
| q4_1   | 20    | 5.0    | 0: d; 2: m; 4: qs[16] as q4_0                                        | d·q + m           |
| q5_0   | 22    | 5.5    | 0: d; 2: qh u32, bit j = bit 4 of q[j]; 6: qs[16] (low nibbles)      | d·(q − 16)        |
| q5_1   | 24    | 6.0    | 0: d; 2: m; 4: qh u32; 8: qs[16]                                     | d·q + m           |
| q8_0   | 34    | 8.5    | 0: d; 2: int8[32] = q − 128                                          | d·(q − 128)       |
| iq4_nl | 18    | 4.5    | as q4_0                                                              | d·LEVELS[q]       |
| q2_k   | 84    | 2.625  | 0: nib(sc_j, m_j)[16]; 16: qs[64]; 80: d; 82: dmin                   | d·sc_j·q − dmin·m_j |
| q3_k   | 110   | 3.4375 | 0: hmask[32] (bit 2 of q); 32: qs[64] (bits 0-1); 96: sc[12]; 108: d | d·sc_j·(q − 4)    |
| q4_k   | 144   | 4.5    | 0: d; 2: dmin; 4: sc/m[12] (6-bit); 16: qs[128]                      | d·sc_j·q − dmin·m_j |
| q5_k   | 176   | 5.5    | 0: d; 2: dmin; 4: sc/m[12]; 16: qh[32] (bit 4 of q); 48: qs[128]     | d·sc_j·q − dmin·m_j |
| q6_k   | 210   | 6.5625 | 0: ql[128] (bits 0-3); 128: qh[64] (bits 4-5); 192: sc int8[16]; 208: d | d·sc_j·(q − 32) |

Sub-blocks (j) are 16 values for q2_k, q3_k, q6_k and 32 for q4_k, q5_k. The k-quant bit planes interleave
groups of 32 consecutive values: in a chunk of 128 (q2_k/q3_k qs, q6_k qh) byte l holds values l, l+32, l+64,
l+96 at bits 0, 2, 4, 6; q4_k/q5_k qs hold values l and l+32 of each chunk of 64 in their two nibbles; q6_k ql
holds values l and l+64 of each chunk of 128; q3_k hmask / q5_k qh bit b of byte l is value 32·b + l. Sub-scales:

- q3_k: sc_j + 32 (6 bits): low nibble in byte j % 8 (j < 8 low half, j ≥ 8 high half), bits 4-5 in byte
  8 + j % 4 at bit 2·(j // 4). Signed −32..31.
- q4_k/q5_k: for j < 4, sc_j and m_j are the low 6 bits of bytes j and j + 4; for j ≥ 4 the low nibbles sit in
  byte j + 4 (sc low, m high) and bits 4-5 in the top two bits of bytes j − 4 (sc) and j (m). Unsigned 0..63.

Raw params per block (`params[..., P]`, fp32 holding exact values: fp16-representable d/dmin/m, integer sub-scales):

    q4_0 q5_0 q8_0 iq4_nl: [d]      q4_1 q5_1: [d, m]      q3_k q6_k: [d, sc_0..15]
    q2_k: [d, dmin, sc_0..15, m_0..15] (4-bit)             q4_k q5_k: [d, dmin, sc_0..7, m_0..7] (6-bit)

`dequantize` forms the products in the order gguf's numpy decoder does (d·sc first, in fp32, then ·q, then
− dmin·m), so it is bit-identical to `gguf.quants.dequantize` of `pack`'s bytes.

Signs: d of the symmetric types is usually negative (like llama.cpp, the value of largest magnitude goes to
the long end of the code range, q = 0), q3_k/q6_k sub-scales are signed, so `columns`' scale may be negative
(and zero for a zero block); `nearest` handles both.

`choose` is a weighted least-squares scale search in the spirit of llama.cpp's make_qx_quants /
make_qkx3_quants / make_qp_quants and iq4_nl's scale search (ggml/src/ggml-quants.c), but every decision past
the per-sub-block fit is taken on the true block error after fp16 rounding and re-rounding of the codes: the
super-scale from a set of candidates, each sub-scale (and min) nudged ±1 (±2 for q2_k), (d, dmin) refitted by
least squares on the chosen integers, and finally the plain min-max grid kept instead wherever it is better
(so no block is worse than min-max in the weighted error, nor than llama.cpp's reference d for q4_0..q8_0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from compress.errors import CompressError


@dataclass(frozen=True)
class GgmlType:
    name: str  # "q4_k"
    gguf_type: int  # gguf.GGMLQuantizationType value
    block: int  # elements per block (32 or 256)
    type_size: int  # bytes per block
    sub: int  # elements per sub-block sharing one effective scale
    qmax: int  # largest code (codes are unsigned 0..qmax)
    n_params: int  # raw header params per block

    @property
    def bpw(self) -> float:
        return self.type_size * 8 / self.block


TYPES: dict[str, GgmlType] = {
    t.name: t
    for t in (
        GgmlType("q4_0", 2, 32, 18, 32, 15, 1),
        GgmlType("q4_1", 3, 32, 20, 32, 15, 2),
        GgmlType("q5_0", 6, 32, 22, 32, 31, 1),
        GgmlType("q5_1", 7, 32, 24, 32, 31, 2),
        GgmlType("q8_0", 8, 32, 34, 32, 255, 1),
        GgmlType("iq4_nl", 20, 32, 18, 32, 15, 1),
        GgmlType("q2_k", 10, 256, 84, 16, 3, 34),
        GgmlType("q3_k", 11, 256, 110, 16, 7, 17),
        GgmlType("q4_k", 12, 256, 144, 32, 15, 18),
        GgmlType("q5_k", 13, 256, 176, 32, 31, 18),
        GgmlType("q6_k", 14, 256, 210, 16, 63, 17),
    )
}

# llama-quantize's substitute when a row length is not a multiple of 256 (src/llama-quant.cpp,
# tensor_type_fallback; the same in the llama.cpp vendored by llama-cpp-python 0.3.36). Older llama.cpp (the
# switch in llama_tensor_get_type) sent q2_k/q3_k to iq4_nl instead of q4_0.
FALLBACK: dict[str, str] = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}

# The 16 values of iq4_nl (a format constant), ascending.
LEVELS_IQ4NL: Tensor = torch.tensor(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.float32
)
# The midpoints between them are multiples of 1/2, so the nearest level of v depends only on ceil(2v): tables
# over ceil(2v) in -256..228 (beyond that, the end levels) of the index and of the value replace a search.
_IQ4NL_INDEX = torch.bucketize(torch.arange(-256, 229) / 2, (LEVELS_IQ4NL[1:] + LEVELS_IQ4NL[:-1]) / 2)
_IQ4NL_VALUE = LEVELS_IQ4NL[_IQ4NL_INDEX]

# Zero point of the symmetric grids (value = scale·(q − zero)); 0 for the grids with a min.
_ZERO = {"q4_0": 8, "q5_0": 16, "q8_0": 128, "q3_k": 4, "q6_k": 32}
# Integer range of the k-quant sub-scales (and of the mins, where there are some).
_SUB_RANGE = {"q2_k": (0, 15), "q3_k": (-32, 31), "q4_k": (0, 63), "q5_k": (0, 63), "q6_k": (-128, 127)}
_AFFINE = ("q4_1", "q5_1")
_K_MIN = ("q2_k", "q4_k", "q5_k")  # k-quants with a min
_K_SYM = ("q3_k", "q6_k")

_CHUNK = 1 << 16  # values per choose() chunk: the candidate tensors are a few dozen times this
# q8_0 also tries stretches of the reference scale as they are (not refitted): at 8 bits the rounding pattern
# of a block changes every ~0.4% of scale, and the best of such a fan lowers the error ~7% below the least-squares
# fit (which is already within 0.4% of an exhaustive search for the 4- and 5-bit types).
_FAN = {"q8_0": torch.linspace(0.98, 1.10, 25)}


def _type(name: str) -> GgmlType:
    try:
        return TYPES[name]
    except KeyError:
        raise CompressError(f"unknown ggml type {name!r}; known: {', '.join(TYPES)}") from None


def fits(name: str, K: int) -> bool:
    """Whether rows of K values cut into whole blocks of this type."""
    return K > 0 and K % _type(name).block == 0


def _check_fits(t: GgmlType, K: int) -> None:
    if not fits(t.name, K):
        fb = FALLBACK.get(t.name)
        hint = f"; llama-quantize falls back to {fb} for such rows" if fb else ""
        raise CompressError(f"{t.name} needs rows of a multiple of {t.block} values, got K={K}{hint}")


# ----------------------------------------------------------------------------------------------------- bytes


def _interleave(fields: Tensor, width: int) -> Tensor:
    """[..., G, L] small ints -> [..., L] uint8: field g of each lane at bits width·g."""
    shifts = torch.arange(fields.shape[-2], dtype=torch.int32, device=fields.device).mul_(width).unsqueeze(-1)
    return (fields.to(torch.int32) << shifts).sum(-2).to(torch.uint8)


def _deinterleave(b: Tensor, groups: int, width: int) -> Tensor:
    """[..., L] uint8 -> [..., G, L] int32: the inverse of _interleave."""
    shifts = torch.arange(groups, dtype=torch.int32, device=b.device).mul_(width).unsqueeze(-1)  # [G, 1]
    return (b.to(torch.int32).unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _f16_bytes(x: Tensor) -> Tensor:
    """[M] fp32 -> [M, 2] uint8, the fp16 little-endian bytes."""
    return x.to(torch.float16).unsqueeze(-1).view(torch.uint8)


def _bytes_f16(b: Tensor) -> Tensor:
    """[M, 2] uint8 -> [M] fp32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _f16(x: Tensor) -> Tensor:
    """Round to the nearest fp16 (saturating), back in fp32."""
    return x.clamp(-65504.0, 65504.0).to(torch.float16).float()


def _nibbles(q: Tensor) -> Tensor:
    """[M, 32] -> [M, 16]: byte j = nib(q[j], q[j+16])."""
    return _interleave((q & 15).view(-1, 2, 16), 4)


def _qh32(q: Tensor) -> Tensor:
    """[M, 32] -> [M, 4]: the u32 whose bit j is bit 4 of q[j]."""
    return _interleave(((q >> 4) & 1).view(-1, 4, 8).transpose(-1, -2), 1)


def _k4_scales(sc: Tensor, m: Tensor) -> Tensor:
    """[M, 8] sub-scales and mins (0..63) -> [M, 12] bytes (q4_k/q5_k)."""
    lo = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6)], -1)
    return torch.cat([lo, (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], -1).to(torch.uint8)


def _k4_unscales(b: Tensor) -> tuple[Tensor, Tensor]:
    b = b.to(torch.int32)
    sc = torch.cat([b[:, 0:4] & 63, (b[:, 8:12] & 15) | ((b[:, 0:4] >> 6) << 4)], -1)
    m = torch.cat([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], -1)
    return sc, m


def _q3_scales(u: Tensor) -> Tensor:
    """[M, 16] sub-scales + 32 (0..63) -> [M, 12] bytes."""
    low = u & 15
    return torch.cat([(low[:, :8] | (low[:, 8:] << 4)).to(torch.uint8), _interleave((u >> 4).view(-1, 4, 4), 2)], -1)


def _q3_unscales(b: Tensor) -> Tensor:
    b = b.to(torch.int32)
    low = torch.cat([b[:, :8] & 15, b[:, :8] >> 4], -1)
    return low | (_deinterleave(b[:, 8:12], 4, 2).reshape(-1, 16) << 4)


def _int_params(p: Tensor, lo: int, hi: int, what: str, name: str) -> Tensor:
    v = p.round().to(torch.int32)
    if v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
        raise CompressError(f"{name}: {what} must lie in {lo}..{hi}, got {int(v.min())}..{int(v.max())}")
    return v


def pack(name: str, codes: Tensor, params: Tensor) -> Tensor:
    """codes uint8 [N, K], params fp32 [N, B, P] -> uint8 [N, B·type_size], ggml's bytes (blocks row-major)."""
    t = _type(name)
    N, K = codes.shape
    _check_fits(t, K)
    B = K // t.block
    if tuple(params.shape) != (N, B, t.n_params):
        raise CompressError(f"{name}: params must be [{N}, {B}, {t.n_params}], got {list(params.shape)}")
    q = codes.reshape(N * B, t.block).to(torch.int32)  # [M, block]
    if q.numel() and int(q.max()) > t.qmax:
        raise CompressError(f"{name}: codes must lie in 0..{t.qmax}, got up to {int(q.max())}")
    p = params.reshape(N * B, t.n_params).float()  # [M, P]
    d = p[:, 0]
    if name in ("q4_0", "iq4_nl"):
        parts = [_f16_bytes(d), _nibbles(q)]
    elif name == "q4_1":
        parts = [_f16_bytes(d), _f16_bytes(p[:, 1]), _nibbles(q)]
    elif name == "q5_0":
        parts = [_f16_bytes(d), _qh32(q), _nibbles(q)]
    elif name == "q5_1":
        parts = [_f16_bytes(d), _f16_bytes(p[:, 1]), _qh32(q), _nibbles(q)]
    elif name == "q8_0":
        parts = [_f16_bytes(d), (q - 128).to(torch.int8).view(torch.uint8)]
    elif name == "q2_k":
        sc = _int_params(p[:, 2:18], 0, 15, "sub-scales", name)
        m = _int_params(p[:, 18:34], 0, 15, "mins", name)
        qs = _interleave(q.view(-1, 2, 4, 32), 2).view(-1, 64)
        parts = [(sc | (m << 4)).to(torch.uint8), qs, _f16_bytes(d), _f16_bytes(p[:, 1])]
    elif name == "q3_k":
        sc = _int_params(p[:, 1:17], -32, 31, "sub-scales", name)
        hmask = _interleave(((q >> 2) & 1).view(-1, 8, 32), 1)
        qs = _interleave((q & 3).view(-1, 2, 4, 32), 2).view(-1, 64)
        parts = [hmask, qs, _q3_scales(sc + 32), _f16_bytes(d)]
    elif name in ("q4_k", "q5_k"):
        sc = _int_params(p[:, 2:10], 0, 63, "sub-scales", name)
        m = _int_params(p[:, 10:18], 0, 63, "mins", name)
        parts = [_f16_bytes(d), _f16_bytes(p[:, 1]), _k4_scales(sc, m)]
        if name == "q5_k":
            parts.append(_interleave(((q >> 4) & 1).view(-1, 8, 32), 1))
        parts.append(_interleave((q & 15).view(-1, 4, 2, 32), 4).view(-1, 128))
    else:  # q6_k
        sc = _int_params(p[:, 1:17], -128, 127, "sub-scales", name)
        ql = _interleave((q & 15).view(-1, 2, 2, 64), 4).view(-1, 128)
        qh = _interleave((q >> 4).view(-1, 2, 4, 32), 2).view(-1, 64)
        parts = [ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)]
    out = torch.cat(parts, -1)  # [M, type_size]
    return out.view(N, B * t.type_size)


def unpack(name: str, blocks: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """uint8 [N, B·type_size] -> (codes uint8 [N, K], params fp32 [N, B, P]); the inverse of pack."""
    t = _type(name)
    _check_fits(t, K)
    N, B = blocks.shape[0], K // t.block
    if blocks.shape[1] != B * t.type_size:
        raise CompressError(f"{name}: {K} values per row take {B * t.type_size} bytes, got {blocks.shape[1]}")
    b = blocks.reshape(N * B, t.type_size)  # [M, type_size]
    M = N * B

    def nib(x: Tensor) -> Tensor:  # [M, 16] -> [M, 32]
        return _deinterleave(x, 2, 4).reshape(M, 32)

    def qh32(x: Tensor) -> Tensor:  # [M, 4] -> [M, 32] bit 4
        return _deinterleave(x, 8, 1).transpose(-1, -2).reshape(M, 32) << 4

    f = _bytes_f16
    if name in ("q4_0", "iq4_nl"):
        q, p = nib(b[:, 2:18]), [f(b[:, 0:2])]
    elif name == "q4_1":
        q, p = nib(b[:, 4:20]), [f(b[:, 0:2]), f(b[:, 2:4])]
    elif name == "q5_0":
        q, p = nib(b[:, 6:22]) | qh32(b[:, 2:6]), [f(b[:, 0:2])]
    elif name == "q5_1":
        q, p = nib(b[:, 8:24]) | qh32(b[:, 4:8]), [f(b[:, 0:2]), f(b[:, 2:4])]
    elif name == "q8_0":
        q, p = b[:, 2:34].contiguous().view(torch.int8).to(torch.int32) + 128, [f(b[:, 0:2])]
    elif name == "q2_k":
        s = b[:, 0:16].to(torch.int32)
        q = _deinterleave(b[:, 16:80].reshape(M, 2, 32), 4, 2).reshape(M, 256)
        p = [f(b[:, 80:82]), f(b[:, 82:84]), *(s & 15).float().unbind(-1), *(s >> 4).float().unbind(-1)]
    elif name == "q3_k":
        high = _deinterleave(b[:, 0:32], 8, 1).reshape(M, 256)
        q = _deinterleave(b[:, 32:96].reshape(M, 2, 32), 4, 2).reshape(M, 256) | (high << 2)
        p = [f(b[:, 108:110]), *(_q3_unscales(b[:, 96:108]) - 32).float().unbind(-1)]
    elif name in ("q4_k", "q5_k"):
        sc, m = _k4_unscales(b[:, 4:16])
        off = 48 if name == "q5_k" else 16
        q = _deinterleave(b[:, off : off + 128].reshape(M, 4, 32), 2, 4).reshape(M, 256)
        if name == "q5_k":
            q = q | (_deinterleave(b[:, 16:48], 8, 1).reshape(M, 256) << 4)
        p = [f(b[:, 0:2]), f(b[:, 2:4]), *sc.float().unbind(-1), *m.float().unbind(-1)]
    else:  # q6_k
        low = _deinterleave(b[:, 0:128].reshape(M, 2, 64), 2, 4).reshape(M, 256)
        high = _deinterleave(b[:, 128:192].reshape(M, 2, 32), 4, 2).reshape(M, 256)
        sc = b[:, 192:208].contiguous().view(torch.int8).float()
        q, p = low | (high << 4), [f(b[:, 208:210]), *sc.unbind(-1)]
    params = torch.stack(p, -1).view(N, B, t.n_params)
    return q.to(torch.uint8).view(N, K), params


# ---------------------------------------------------------------------------------------------------- decode


def _split(t: GgmlType, p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """params [..., P] -> (d [...], dmin or m [...], sub-scales [..., S], mins [..., S]), all fp32, exact.

    For the single-scale types the sub-scale is 1 and the min 0 (S = 1); q4_1/q5_1 return m as the second."""
    one = torch.ones_like(p[..., :1])
    d = _f16(p[..., 0])
    if t.name in _AFFINE:
        return d, _f16(p[..., 1]), one, one * 0
    if t.name in _K_MIN:
        S = (t.n_params - 2) // 2
        return d, _f16(p[..., 1]), p[..., 2 : 2 + S].round(), p[..., 2 + S :].round()
    if t.name in _K_SYM:
        return d, d * 0, p[..., 1:].round(), p[..., 1:] * 0
    return d, d * 0, one, one * 0


def dequantize(name: str, codes: Tensor, params: Tensor) -> Tensor:
    """codes uint8 [N, K], params [N, B, P] -> fp32 [N, K], bit-identical to gguf's decode of pack()."""
    t = _type(name)
    N, K = codes.shape
    _check_fits(t, K)
    B = K // t.block
    q = codes.reshape(N, B, t.block // t.sub, t.sub).float()  # [N, B, S, sub]
    d, dm, sc, m = _split(t, params.float())
    d, dm = d[..., None, None], dm[..., None, None]  # [N, B, 1, 1]
    if name == "iq4_nl":
        out = d * _lookup(LEVELS_IQ4NL, codes.reshape(q.shape))
    elif name in _AFFINE:
        out = d * q + dm
    elif name in _K_MIN:
        out = (d * sc[..., None]) * q - dm * m[..., None]
    elif name in _K_SYM:
        out = (d * sc[..., None]) * (q - _ZERO[name])
    else:
        out = d * (q - _ZERO[name])
    return out.reshape(N, K)


def _grid(t: GgmlType, params: Tensor) -> tuple[Tensor, Tensor]:
    """params [N, B, P] -> per sub-block (scale, offset) [N, B, S] with value ≈ scale·q − offset."""
    d, dm, sc, m = _split(t, params.float())
    if t.name in _AFFINE:
        return d[..., None], -dm[..., None]
    if t.name in _K_MIN:
        return d[..., None] * sc, dm[..., None] * m
    scale = d[..., None] * sc
    return scale, scale * _ZERO.get(t.name, 0)


def columns(name: str, params: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Per-column (scale [N, K], offset [N, K]): value ≈ scale·q − offset (iq4_nl: scale·LEVELS[q], offset 0)."""
    t = _type(name)
    _check_fits(t, K)
    scale, offset = _grid(t, params)  # [N, B, S]
    N = params.shape[0]
    rep = t.sub
    return scale.repeat_interleave(rep, -1).reshape(N, K), offset.repeat_interleave(rep, -1).reshape(N, K)


def _lookup(table: Tensor, idx: Tensor) -> Tensor:
    """table[idx] for a small table (index_select on int32: several times faster than table[idx] on CPU)."""
    return table.to(idx.device).index_select(0, idx.reshape(-1).int()).view(idx.shape)


def _nearest_level(v: Tensor, value: bool = False) -> Tensor:
    """Index (or value) of the iq4_nl level nearest v, in units of d; a tie goes to the lower level."""
    j = (2 * v).ceil_().clamp_(-256, 228).add_(256)
    return _lookup(_IQ4NL_VALUE if value else _IQ4NL_INDEX, j)


def nearest(name: str, w: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """Codes (float, integer-valued) of the grid point nearest each w, for per-element scale and offset."""
    t = _type(name)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    if name == "iq4_nl":
        idx = _nearest_level(w / safe)
        return torch.where(scale == 0, 8, idx).float()  # level 8 (= 1) decodes to 0 when d is 0
    q = ((w + offset) / safe).round_().clamp_(0, t.qmax)
    return torch.where(scale == 0, float(_ZERO.get(name, 0)), q)


def value(name: str, q: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """The value of codes q (float, integer-valued) with per-element scale and offset (`columns`): scale·q − offset,
    iq4_nl: scale·LEVELS[q]. In fp32 as one product and one difference, which is ggml's order for every type but the
    symmetric ones, whose offset folds the zero point in (within an ulp of `dequantize`; GPTQ's feedback only)."""
    if name == "iq4_nl":
        return scale * LEVELS_IQ4NL.to(q.device)[q.long()]
    return scale * q - offset


def round_nearest(name: str, W: Tensor, params: Tensor) -> Tensor:
    """Codes uint8 [N, K] rounding W to the nearest point of the grid given by params."""
    scale, offset = columns(name, params, W.shape[1])
    return nearest(name, W.float(), scale, offset).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------- choose


def _weights(t: GgmlType, x: Tensor, importance: Tensor | None) -> Tensor:
    """Per-value weights of the squared error, [n, K] (x: [n, K]).

    With an importance vector: that vector, per column (it measures best on Σ importance·err², see the tests).
    Without: llama.cpp's no-imatrix weighting: x² (q3_k, q6_k, iq4_nl), rms(sub-block) + |x| (q4_k, q5_k, and
    q2_k, where llama.cpp's |x| alone lets the zeros of a sparse row drift: 20 dB -> -3 dB), uniform for the
    legacy types (whose reference quantizers minimise plain error)."""
    if importance is not None:
        imp = importance.float().clamp(min=0).reshape(1, -1)
        mean = float(imp.mean())
        imp = imp + 1e-6 * mean if mean > 0 else torch.ones_like(imp)  # all-zero sub-blocks still get a fit
        return imp.expand_as(x)
    if t.name in ("q3_k", "q6_k", "iq4_nl"):
        return x * x
    if t.name in _K_MIN:
        xs = x.view(x.shape[0], -1, t.sub)
        return (xs.square().mean(-1, keepdim=True).sqrt() + xs.abs()).view_as(x)
    return torch.ones_like(x)


def _grid_err(x: Tensor, w: Tensor, scale: Tensor, offset: Tensor, qmax: int) -> Tensor:
    """Σ w·(x − x̂)² over the last dim, x̂ the nearest point of scale·q − offset, q in 0..qmax.

    x, w: [..., n]; scale, offset: broadcastable to [...] (a trailing dim is added). A zero scale decodes
    every code to −offset, so its codes need no care."""
    scale, offset = scale.unsqueeze(-1), offset.unsqueeze(-1)
    inv = 1 / torch.where(scale == 0, torch.ones_like(scale), scale)
    v = ((x + offset) * inv).round_().clamp_(0, qmax)  # codes, [..., n] in full
    v = v.mul_(scale).sub_(offset).sub_(x)  # x̂ − x
    return v.square_().mul_(w).sum(-1)


def _level_err(x: Tensor, w: Tensor, d: Tensor) -> Tensor:
    """_grid_err for iq4_nl: x̂ = d·LEVELS[nearest]."""
    d = d.unsqueeze(-1)
    inv = 1 / torch.where(d == 0, torch.ones_like(d), d)
    v = _nearest_level(x * inv, value=True)
    return v.mul_(d).sub_(x).square_().mul_(w).sum(-1)


def _ls_sym(x: Tensor, w: Tensor, lev: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares scale for levels lev: (s = Σwxl / Σwl², score = (Σwxl)² / Σwl², the error reduction)."""
    slx = (w * x * lev).sum(-1)
    sll = (w * lev * lev).sum(-1)
    ok = sll > 0
    s = torch.where(ok, slx / torch.where(ok, sll, 1.0), 0.0)
    return s, s * slx


def _to_levels(v: Tensor, lo: int, hi: int, nl: bool) -> Tensor:
    """Values in units of the scale -> the grid levels (integers lo..hi, or iq4_nl's)."""
    if nl:
        return _nearest_level(v, value=True)
    return v.round_().clamp_(lo, hi)


def _fit_sym(x: Tensor, w: Tensor, lo: int, hi: int, nl: bool = False) -> Tensor:
    """Best scale s (signed) per row of x [G, n] for x ≈ s·l, l on the levels lo..hi (or iq4_nl's).

    Candidates map the largest |x| to lo + δ or hi − δ (δ in 0..~1 on the long side, a few on the short side;
    like llama.cpp's make_qx_quants / iq4_nl search, both orientations); each is refitted by least squares
    on its levels and scored by the error it removes; then two rounds of re-rounding and refitting."""
    amax, i = x.abs().max(-1, keepdim=True)
    mx = x.gather(-1, i)  # [G, 1], the signed value of largest magnitude
    mx = torch.where(amax > 0, mx, torch.ones_like(mx))
    span = float(hi - lo)
    long_side, short_side = (lo, hi) if -lo >= hi else (hi, lo)
    sgn_l, sgn_s = (1.0 if long_side > 0 else -1.0), (1.0 if short_side > 0 else -1.0)
    step = span / 160 if nl else 0.1
    deltas = torch.arange(-9, 10, dtype=torch.float32, device=x.device) * step
    targets = torch.cat([long_side + sgn_l * deltas, short_side + sgn_s * deltas[::3]])  # [C]
    lev = _to_levels(x.unsqueeze(-2) * (targets / mx).unsqueeze(-1), lo, hi, nl)  # [G, C, n]
    s, score = _ls_sym(x.unsqueeze(-2), w.unsqueeze(-2), lev)  # [G, C]
    best = score.argmax(-1, keepdim=True)
    s, score = s.gather(-1, best).squeeze(-1), score.gather(-1, best).squeeze(-1)  # [G]
    for _ in range(2):
        safe = torch.where(s == 0, torch.ones_like(s), s)
        s2, score2 = _ls_sym(x, w, _to_levels(x / safe.unsqueeze(-1), lo, hi, nl))
        better = score2 > score
        s, score = torch.where(better, s2, s), torch.where(better, score2, score)
    return torch.where(amax.squeeze(-1) > 0, s, 0.0)


def _fit_affine(x: Tensor, w: Tensor, qmax: int, nonpos_min: bool) -> tuple[Tensor, Tensor]:
    """Best (s ≥ 0, mn) per row of x [G, n] for x ≈ s·l + mn, l in 0..qmax (mn ≤ 0 when nonpos_min).

    llama.cpp's make_qkx3_quants search: levels from the range stretched to qmax + δ, a 2×2 weighted least
    squares fit for (s, mn) on each, the best kept; then two rounds of re-rounding and refitting."""
    xmin, xmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if nonpos_min:
        xmin = xmin.clamp(max=0)
    rng = xmax - xmin
    wx = w * x
    Sw, Sx, Sxx = w.sum(-1), wx.sum(-1), (wx * x).sum(-1)  # [G]

    def fit(lev: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # lev [G, C, n] -> (s, mn, err) [G, C]
        Sl = (w.unsqueeze(-2) * lev).sum(-1)
        Sll = (w.unsqueeze(-2) * lev * lev).sum(-1)
        Slx = (wx.unsqueeze(-2) * lev).sum(-1)
        sw, sx, sxx = Sw.unsqueeze(-1), Sx.unsqueeze(-1), Sxx.unsqueeze(-1)
        det = sw * Sll - Sl * Sl
        ok = det > sw * Sll * 1e-30
        Ds = torch.where(ok, det, 1.0)
        s, mn = (sw * Slx - sx * Sl) / Ds, (Sll * sx - Sl * Slx) / Ds
        if nonpos_min:
            pos = mn > 0
            s = torch.where(pos, Slx / torch.where(Sll > 0, Sll, 1.0), s)
            mn = torch.where(pos, 0.0, mn)
        err = sxx - 2 * s * Slx - 2 * mn * sx + s * s * Sll + 2 * s * mn * Sl + mn * mn * sw
        return s, mn, torch.where(ok & (s >= 0), err, torch.inf)

    deltas = torch.arange(-10, 11, dtype=torch.float32, device=x.device) * 0.1  # [C]
    safe_rng = torch.where(rng > 0, rng, torch.ones_like(rng))
    iscale = (qmax + deltas) / safe_rng  # [G, C]
    lev = ((x.unsqueeze(-2) - xmin.unsqueeze(-1)) * iscale.unsqueeze(-1)).round_().clamp_(0, qmax)
    s, mn, err = fit(lev)
    best = err.argmin(-1, keepdim=True)
    s, mn, err = (v.gather(-1, best).squeeze(-1) for v in (s, mn, err))
    # the plain min-max grid, as one more candidate
    s0, mn0 = (rng / qmax).squeeze(-1), xmin.squeeze(-1)
    err0 = _grid_err(x, w, s0, -mn0, qmax)
    take0 = ~(err <= err0)
    s, mn, err = torch.where(take0, s0, s), torch.where(take0, mn0, mn), torch.where(take0, err0, err)
    for _ in range(2):
        safe = torch.where(s > 0, s, torch.ones_like(s))
        lev = ((x - mn.unsqueeze(-1)) / safe.unsqueeze(-1)).round_().clamp_(0, qmax)
        s2, mn2, err2 = (v.squeeze(-1) for v in fit(lev.unsqueeze(-2)))
        better = err2 < err
        s, mn, err = torch.where(better, s2, s), torch.where(better, mn2, mn), torch.where(better, err2, err)
    return s, mn


def _pick(err: Tensor, *cands: Tensor) -> list[Tensor]:
    """Index each candidate tensor [..., C, *rest] at argmin over C of err [..., C]."""
    best = err.argmin(-1)
    out = []
    for c in cands:
        idx = best.view(*best.shape, 1, *([1] * (c.dim() - err.dim()))).expand(*best.shape, 1, *c.shape[err.dim() :])
        out.append(c.gather(err.dim() - 1, idx).squeeze(err.dim() - 1))
    return out


def _choose_single(t: GgmlType, x: Tensor, w: Tensor) -> Tensor:
    """q4_0 q5_0 q8_0 iq4_nl q4_1 q5_1: x, w [M, 32] -> params [M, P]."""
    name = t.name
    if name in _AFFINE:
        s, mn = _fit_affine(x, w, t.qmax, nonpos_min=False)
        xmin, xmax = x.amin(-1), x.amax(-1)
        d = torch.stack([_f16(s), _f16((xmax - xmin) / t.qmax)], -1)  # [M, 2] (search, min-max)
        m = torch.stack([_f16(mn), _f16(xmin)], -1)
        err = _grid_err(x.unsqueeze(-2), w.unsqueeze(-2), d, -m, t.qmax)
        d, m = _pick(err, d, m)
        return torch.stack([d, m], -1)
    nl = name == "iq4_nl"
    lo, hi = (-127, 113) if nl else (-_ZERO[name], t.qmax - _ZERO[name])
    s = _fit_sym(x, w, lo, hi, nl)
    mx = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # [M, 1]
    # the search's scale, the reference ones (largest |x| on either end level: llama.cpp's), a fan of stretches
    fan = mx * _FAN.get(name, torch.ones(0)).to(x.device) / lo  # [M, F]
    d = _f16(torch.cat([s.unsqueeze(-1), mx / lo, -mx / hi, fan], -1))  # [M, 3 + F]
    if nl:
        err = _level_err(x.unsqueeze(-2), w.unsqueeze(-2), d)
    else:
        err = _grid_err(x.unsqueeze(-2), w.unsqueeze(-2), d, d * _ZERO[name], t.qmax)
    return _pick(err, d)[0].unsqueeze(-1)


def _k_err(t: GgmlType, x: Tensor, w: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """Error per sub-block: x, w [..., n] against grids scale·q − offset (symmetric types: offset = zero·scale)."""
    if t.name in _K_SYM:
        offset = scale * _ZERO[t.name]
    return _grid_err(x, w, scale, offset, t.qmax)


def _choose_k(t: GgmlType, x: Tensor, w: Tensor) -> Tensor:
    """k-quants: x, w [M, S, sub] (M super-blocks of S sub-blocks) -> params [M, P]."""
    name, (lo, hi) = t.name, _SUB_RANGE[t.name]
    M, S, n = x.shape
    has_min = name in _K_MIN
    xs, ws = x.reshape(M * S, n), w.reshape(M * S, n)
    # 1. the continuous (scale, min) of each sub-block
    if has_min:
        s, mn = _fit_affine(xs, ws, t.qmax, nonpos_min=True)
        s, m = s.view(M, S), (-mn).view(M, S)  # value = s·q − m, s ≥ 0, m ≥ 0
    else:
        z = _ZERO[name]
        s, m = _fit_sym(xs, ws, -z, t.qmax - z).view(M, S), x.new_zeros(M, S)
    xe, we = x.unsqueeze(1), w.unsqueeze(1)  # [M, 1, S, n]: room for a candidate dim

    def quantize_scales(v: Tensor, d: Tensor, lo: int) -> Tensor:  # [M, S], [M, C] -> integers [M, C, S]
        safe = torch.where(d == 0, torch.ones_like(d), d)
        return (v.unsqueeze(1) / safe.unsqueeze(-1)).round().clamp(lo, hi)

    # 2. super-scale d: candidates around max|s| / range-end, each judged on the true error (mins unrounded)
    steps = torch.arange(-5, 2, dtype=torch.float32, device=x.device) * (0.5 if hi > 15 else 0.25)  # 7 stretches
    if has_min:
        top = s.amax(-1)  # [M]
        ends = hi + steps
    else:
        top = s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed
        ends = torch.cat([lo - steps, hi + steps[::2]])
    d = _f16(top.unsqueeze(-1) / ends)  # [M, C]
    ls = quantize_scales(s, d, lo)  # [M, C, S]
    err = _k_err(t, xe, we, d.unsqueeze(-1) * ls, m.unsqueeze(1)).sum(-1)  # [M, C]
    d, ls = _pick(err, d, ls)  # [M], [M, S]
    # 3. dmin, the same way, given d
    if has_min:
        mtop = m.amax(-1)
        dm = _f16(mtop.unsqueeze(-1) / ends)
        lm = quantize_scales(m, dm, 0)
        err = _k_err(t, xe, we, (d.unsqueeze(-1) * ls).unsqueeze(1), dm.unsqueeze(-1) * lm).sum(-1)
        dm, lm = _pick(err, dm, lm)
    else:
        dm, lm = x.new_zeros(M), x.new_zeros(M, S)

    reach = 2 if hi <= 15 else 1
    steps = torch.arange(-reach, reach + 1, dtype=torch.float32, device=x.device)

    def refine(d: Tensor, dm: Tensor, ls: Tensor, lm: Tensor) -> tuple[Tensor, Tensor]:
        """4. each sub-scale (and min) moved within ±reach where that lowers its sub-block's error."""
        a = (ls.unsqueeze(-1) + steps).clamp(lo, hi)  # [M, S, A]
        if has_min:
            b = (lm.unsqueeze(-1) + steps).clamp(0, hi)
            a, b = a.unsqueeze(-1).expand(-1, -1, -1, len(steps)), b.unsqueeze(-2).expand(-1, -1, len(steps), -1)
            a, b = a.reshape(M, S, -1), b.reshape(M, S, -1)  # [M, S, A²]
        else:
            b = torch.zeros_like(a)
        sc = d.view(M, 1, 1) * a
        e = _k_err(t, x.unsqueeze(-2), w.unsqueeze(-2), sc, dm.view(M, 1, 1) * b)  # [M, S, A]
        return _pick(e, a, b)

    def total(d: Tensor, dm: Tensor, ls: Tensor, lm: Tensor) -> Tensor:
        return _k_err(t, x, w, d.unsqueeze(-1) * ls, dm.unsqueeze(-1) * lm).sum(-1)  # [M]

    ls, lm = refine(d, dm, ls, lm)
    err = total(d, dm, ls, lm)
    for _ in range(2):
        # 5. (d, dmin) refitted by least squares on the chosen integers and codes, then the sub-scales again
        sc, off = d.view(M, 1) * ls, dm.view(M, 1) * lm
        if has_min:
            safe = torch.where(sc == 0, torch.ones_like(sc), sc)
            q = ((x + off.unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp(0, t.qmax)
            q = torch.where(sc.unsqueeze(-1) == 0, 0.0, q)
            a, b = ls.unsqueeze(-1) * q, lm.unsqueeze(-1).expand_as(q)  # value = d·a − dmin·b
            Saa, Sab, Sbb = ((w * a * a).sum((1, 2)), (w * a * b).sum((1, 2)), (w * b * b).sum((1, 2)))
            Sax, Sbx = (w * a * x).sum((1, 2)), (w * b * x).sum((1, 2))
            det = Saa * Sbb - Sab * Sab
            ok = det > Saa * Sbb * 1e-20
            Ds = torch.where(ok, det, 1.0)
            d2 = torch.where(ok, (Sax * Sbb - Sbx * Sab) / Ds, d)
            dm2 = torch.where(ok, -(Saa * Sbx - Sab * Sax) / Ds, dm)
        else:
            safe = torch.where(sc == 0, torch.ones_like(sc), sc)
            q = ((x / safe.unsqueeze(-1)).round() + _ZERO[name]).clamp(0, t.qmax) - _ZERO[name]
            a = ls.unsqueeze(-1) * q
            Saa, Sax = (w * a * a).sum((1, 2)), (w * a * x).sum((1, 2))
            d2, dm2 = torch.where(Saa > 0, Sax / torch.where(Saa > 0, Saa, 1.0), d), dm
        d2, dm2 = _f16(d2), _f16(dm2)
        ls2, lm2 = refine(d2, dm2, ls, lm)
        err2 = total(d2, dm2, ls2, lm2)
        better = err2 < err
        d, dm, err = torch.where(better, d2, d), torch.where(better, dm2, dm), torch.where(better, err2, err)
        ls, lm = torch.where(better.unsqueeze(-1), ls2, ls), torch.where(better.unsqueeze(-1), lm2, lm)
    # 6. the plain min-max grid wherever it is better
    d0, dm0, ls0, lm0 = _minmax_k(t, x)
    err0 = total(d0, dm0, ls0, lm0)
    take = (err0 < err).unsqueeze(-1)
    d, dm = torch.where(take[:, 0], d0, d), torch.where(take[:, 0], dm0, dm)
    ls, lm = torch.where(take, ls0, ls), torch.where(take, lm0, lm)
    if has_min:
        return torch.cat([d.unsqueeze(-1), dm.unsqueeze(-1), ls, lm], -1)
    return torch.cat([d.unsqueeze(-1), ls], -1)


def _minmax_k(t: GgmlType, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The plain grid: each sub-block's range (or max |x|) on the codes, sub-scales rounded under max/range-end."""
    lo, hi = _SUB_RANGE[t.name]
    if t.name in _K_MIN:
        xmin = x.amin(-1).clamp(max=0)
        s, m = (x.amax(-1) - xmin) / t.qmax, -xmin
        d, dm = _f16(s.amax(-1) / hi), _f16(m.amax(-1) / hi)
        sd = torch.where(d == 0, torch.ones_like(d), d).unsqueeze(-1)
        sdm = torch.where(dm == 0, torch.ones_like(dm), dm).unsqueeze(-1)
        return d, dm, (s / sd).round().clamp(0, hi), (m / sdm).round().clamp(0, hi)
    z = _ZERO[t.name]
    s = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1) / -z  # [M, S]
    top = s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)
    d = _f16(top / lo)
    sd = torch.where(d == 0, torch.ones_like(d), d).unsqueeze(-1)
    return d, torch.zeros_like(d), (s / sd).round().clamp(lo, hi), torch.zeros_like(s)


def choose(name: str, W: Tensor, importance: Tensor | None = None) -> Tensor:
    """W fp32 [N, K] -> params [N, B, P]: each block's scales (and mins), searched to minimise the weighted
    squared error and snapped to the format's grid. importance [K] ≥ 0 weighs each column (e.g. diag XᵀX);
    None uses llama.cpp's weighting without an imatrix."""
    t = _type(name)
    N, K = W.shape
    _check_fits(t, K)
    if importance is not None and importance.shape != (K,):
        raise CompressError(f"{name}: importance must be [{K}], got {list(importance.shape)}")
    W = W.detach().float()
    if not bool(torch.isfinite(W).all()):
        raise CompressError(f"{name}: the weights hold NaN or inf values")
    if importance is not None:
        importance = importance.detach().float().to(W.device)
    B = K // t.block
    out = W.new_empty(N, B, t.n_params)
    rows = max(1, (_CHUNK if W.device.type == "cpu" else 16 * _CHUNK) // K)  # bigger launches on GPUs
    for r in range(0, N, rows):
        x = W[r : r + rows]  # [n, K]
        w = _weights(t, x, importance)
        n = x.shape[0]
        if t.block == 32:
            p = _choose_single(t, x.reshape(n * B, 32), w.reshape(n * B, 32))
        else:
            S = t.block // t.sub
            p = _choose_k(t, x.reshape(n * B, S, t.sub), w.reshape(n * B, S, t.sub))
        out[r : r + n] = p.view(n, B, t.n_params)
    return out


def quantize(name: str, W: Tensor, importance: Tensor | None = None) -> Tensor:
    """choose + round_nearest + pack: uint8 [N, B·type_size] (round-to-nearest, like llama-quantize)."""
    params = choose(name, W, importance)
    return pack(name, round_nearest(name, W, params), params)
