"""ggml block formats (compress/ggml.py): exact bytes against the gguf package's decoder, round trips,
the scale search against min-max grids and llama.cpp's reference quantizers, nearest-code rounding."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from compress import ggml
from compress.errors import CompressError

NAMES = list(ggml.TYPES)
# gguf.quants can quantize these (llama.cpp's reference rounding, bit-exact ports)
REFERENCE = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
# SQNR (dB) of quantize() on N(0, 1) weights [64, 1024], seed 0, measured (in brackets) and floored a little below
SQNR_FLOOR = {
    "q4_0": 21.5,  # [21.88]
    "q4_1": 22.8,  # [23.14]
    "q5_0": 27.6,  # [27.99]
    "q5_1": 29.1,  # [29.48]
    "q8_0": 46.2,  # [46.62]
    "iq4_nl": 22.0,  # [22.40]
    "q2_k": 11.1,  # [11.50]
    "q3_k": 16.0,  # [16.32]
    "q4_k": 22.7,  # [23.04]
    "q5_k": 28.9,  # [29.26]
    "q6_k": 34.8,  # [35.18]
}


def gguf_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType(ggml.TYPES[name].gguf_type)


def gguf_decode(name: str, blocks: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf_type(name)))


def random_params(name: str, N: int, B: int, gen: torch.Generator) -> torch.Tensor:
    """Params over their whole valid ranges, with fp16-exact d/dmin/m."""
    t = ggml.TYPES[name]
    p = torch.zeros(N, B, t.n_params)

    def f16(scale: float) -> torch.Tensor:  # magnitudes over 1e-6..1e2 of scale, fp16 subnormals included
        size = 10 ** (torch.rand(N, B, generator=gen) * 8 - 6)
        return (torch.randn(N, B, generator=gen) * scale * size).half().float()

    def ints(lo: int, hi: int, n: int) -> torch.Tensor:
        return torch.randint(lo, hi + 1, (N, B, n), generator=gen).float()

    p[..., 0] = f16(0.01)
    if name in ("q4_1", "q5_1"):
        p[..., 1] = f16(0.1)
    elif name == "q2_k":
        p[..., 1], p[..., 2:] = f16(0.01), ints(0, 15, 32)
    elif name in ("q4_k", "q5_k"):
        p[..., 1], p[..., 2:] = f16(0.01), ints(0, 63, 16)
    elif name == "q3_k":
        p[..., 1:] = ints(-32, 31, 16)
    elif name == "q6_k":
        p[..., 1:] = ints(-128, 127, 16)
    return p


def weights(N: int = 64, K: int = 1024, seed: int = 0) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


def importance(K: int = 1024, seed: int = 1) -> torch.Tensor:
    """Log-normal per-column energies, like the diagonal of XᵀX of a real layer."""
    return torch.randn(K, generator=torch.Generator().manual_seed(seed)).exp()


def err(W: torch.Tensor, W_hat: torch.Tensor, imp: torch.Tensor | None = None) -> float:
    e = (W - W_hat).square()
    return float((e * imp).sum() if imp is not None else e.sum())


def sqnr(W: torch.Tensor, W_hat: torch.Tensor, imp: torch.Tensor | None = None) -> float:
    return 10 * float(np.log10(err(W, torch.zeros_like(W), imp) / err(W, W_hat, imp)))


def minmax(name: str, W: torch.Tensor) -> torch.Tensor:
    """The plain grid (no search): block range or largest |w| on the codes; k-quant sub-scales rounded under
    max / largest integer, as llama.cpp's reference quantizers without their searches."""
    t = ggml.TYPES[name]
    N, K = W.shape
    B, S = K // t.block, t.block // t.sub
    x = W.view(N, B, S, t.sub)
    mx = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)  # [N, B, S] signed largest |w|
    lo, hi = x.amin(-1), x.amax(-1)

    def f16(v: torch.Tensor) -> torch.Tensor:
        return v.half().float()

    def sub_ints(v: torch.Tensor, top: float, lo_int: int) -> tuple[torch.Tensor, torch.Tensor]:
        pick = v.gather(-1, v.abs().argmax(-1, keepdim=True))  # [N, B, 1]
        d = f16(pick / top)
        ints = (v / torch.where(d == 0, 1.0, d)).round().clamp(lo_int, abs(top) if top > 0 else -top - 1)
        return d, ints

    if name in ("q4_0", "q5_0", "iq4_nl"):
        return f16(mx / {"q4_0": -8, "q5_0": -16, "iq4_nl": -127}[name])
    if name == "q8_0":
        return f16(mx.abs() / 127)
    if name in ("q4_1", "q5_1"):
        return torch.cat([f16((hi - lo) / t.qmax), f16(lo)], -1)
    if name in ("q3_k", "q6_k"):
        zero, top = (4, -32) if name == "q3_k" else (32, -128)
        d, sc = sub_ints(mx / -zero, top, top)
        return torch.cat([d, sc], -1)
    top = 15 if name == "q2_k" else 63
    lo = lo.clamp(max=0)
    d, sc = sub_ints((hi - lo) / t.qmax, top, 0)
    dm, m = sub_ints(-lo, top, 0)
    return torch.cat([d, dm, sc, m], -1)


def decode(name: str, W: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return ggml.dequantize(name, ggml.round_nearest(name, W, params), params)


@pytest.mark.parametrize("name", NAMES)
def test_bytes_match_gguf(name: str) -> None:
    t = ggml.TYPES[name]
    assert gguf_type(name).name.lower() == name
    assert gguf.constants.GGML_QUANT_SIZES[gguf_type(name)] == (t.block, t.type_size)
    assert t.bpw == t.type_size * 8 / t.block
    gen = torch.Generator().manual_seed(0)
    for N in (3, 7):
        for B in (1, 2, 3):
            K = B * t.block
            codes = torch.randint(0, t.qmax + 1, (N, K), generator=gen).to(torch.uint8)
            params = random_params(name, N, B, gen)
            blocks = ggml.pack(name, codes, params)
            assert blocks.dtype == torch.uint8 and blocks.shape == (N, B * t.type_size)
            assert torch.equal(ggml.dequantize(name, codes, params), gguf_decode(name, blocks))
            codes2, params2 = ggml.unpack(name, blocks, K)
            assert torch.equal(codes2, codes) and torch.equal(params2, params)
            assert torch.equal(ggml.pack(name, codes2, params2), blocks)


@pytest.mark.parametrize("name", NAMES)
def test_quantize_quality(name: str) -> None:
    W, imp = weights(), importance()
    params = ggml.choose(name, W)
    blocks = ggml.quantize(name, W)
    assert torch.equal(ggml.unpack(name, blocks, W.shape[1])[1], params)  # fp16-exact, integer sub-scales
    assert sqnr(W, gguf_decode(name, blocks)) > SQNR_FLOOR[name]
    # the search beats the plain min-max grid: in plain error without importance ...
    base = minmax(name, W)
    assert err(W, gguf_decode(name, blocks)) < err(W, decode(name, W, base))
    # ... and in importance-weighted error with it, where importance also beats ignoring it
    ours = decode(name, W, ggml.choose(name, W, imp))
    assert err(W, ours, imp) < err(W, decode(name, W, base), imp)
    assert err(W, ours, imp) < err(W, gguf_decode(name, blocks), imp)


@pytest.mark.parametrize("name", REFERENCE)
def test_beats_llama_reference(name: str) -> None:
    """Per block, never worse than llama.cpp's reference rounding (gguf.quants.quantize)."""
    t = ggml.TYPES[name]
    W = weights(seed=2) * torch.rand(64, 1, generator=torch.Generator().manual_seed(3)).add(0.1)
    W[0, :40] = 0  # an all-zero block and a partly zero one
    ref = torch.from_numpy(gguf.quants.quantize(W.numpy(), gguf_type(name)))
    ours = gguf_decode(name, ggml.quantize(name, W))
    per_block = (W - ours).square().view(-1, t.block).sum(-1)
    per_block_ref = (W - gguf_decode(name, ref)).square().view(-1, t.block).sum(-1)
    assert bool((per_block <= per_block_ref * (1 + 1e-6)).all())
    assert float(per_block.sum()) < 0.95 * float(per_block_ref.sum())


def test_fits_and_refusals() -> None:
    assert ggml.fits("q4_k", 1536) and not ggml.fits("q4_k", 576) and ggml.fits("q5_0", 576)
    assert not ggml.fits("q4_0", 48) and not ggml.fits("q8_0", 0)
    for name, fb in ggml.FALLBACK.items():
        assert ggml.TYPES[name].block == 256 and ggml.TYPES[fb].block == 32
    codes, params = torch.zeros(2, 576, dtype=torch.uint8), torch.zeros(2, 2, 18)
    with pytest.raises(CompressError, match=r"q4_k.*256.*K=576.*q5_0"):
        ggml.pack("q4_k", codes, params)
    with pytest.raises(CompressError, match=r"q8_0.*K=40"):
        ggml.quantize("q8_0", torch.zeros(2, 40))
    with pytest.raises(CompressError, match="unknown ggml type"):
        ggml.fits("q7_k", 256)
    with pytest.raises(CompressError, match="codes"):
        ggml.pack("q4_0", torch.full((1, 32), 16, dtype=torch.uint8), torch.zeros(1, 1, 1))
    with pytest.raises(CompressError, match="sub-scales"):
        ggml.pack("q4_k", torch.zeros(1, 256, dtype=torch.uint8), torch.full((1, 1, 18), 64.0))
    with pytest.raises(CompressError, match="NaN"):
        ggml.choose("q4_0", torch.full((1, 32), float("nan")))


@pytest.mark.parametrize("name", NAMES)
def test_nearest_is_nearest(name: str) -> None:
    """round_nearest's codes decode to the closest grid value, checked against every code; and columns()
    describes the same grid."""
    t = ggml.TYPES[name]
    gen = torch.Generator().manual_seed(4)
    N, K = 3, t.block
    params = random_params(name, N, 1, gen)
    W = ggml.dequantize(name, torch.randint(0, t.qmax + 1, (N, K), generator=gen).to(torch.uint8), params)
    W = W + torch.randn(N, K, generator=gen) * W.std() * 0.5  # between and beyond the grid points
    every = torch.arange(t.qmax + 1, dtype=torch.uint8).view(-1, 1, 1).expand(-1, N, K)
    grid = torch.stack([ggml.dequantize(name, c, params) for c in every])  # [qmax + 1, N, K]
    best = (grid - W).abs().amin(0)
    ours = (ggml.dequantize(name, ggml.round_nearest(name, W, params), params) - W).abs()
    assert bool((ours <= best + 1e-6 * W.abs().amax()).all())
    scale, offset = ggml.columns(name, params, K)
    q = ggml.nearest(name, W, scale, offset)
    assert torch.equal(q.to(torch.uint8), ggml.round_nearest(name, W, params))
    value = scale * ggml.LEVELS_IQ4NL[q.long()] if name == "iq4_nl" else scale * q - offset
    torch.testing.assert_close(value, ggml.dequantize(name, q.to(torch.uint8), params), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_rows(name: str) -> None:
    """Zero, constant, tiny, huge and sparse rows; zero or partly zero importance: finite, valid, exact zeros."""
    K = ggml.TYPES[name].block
    gen = torch.Generator().manual_seed(5)
    W = torch.stack(
        [
            torch.zeros(K),
            torch.full((K,), 0.3),
            torch.randn(K, generator=gen) * 1e-7,
            torch.randn(K, generator=gen) * 1e4,
            torch.randn(K, generator=gen) * (torch.rand(K, generator=gen) < 0.1),
        ]
    )
    for imp in (None, torch.zeros(K), (torch.rand(K, generator=gen) < 0.3).float()):
        W_hat = gguf_decode(name, ggml.quantize(name, W, imp))
        assert bool(torch.isfinite(W_hat).all())
        assert bool((W_hat[0] == 0).all())
        assert float((W_hat[3] - W[3]).norm() / W[3].norm()) < 0.5
