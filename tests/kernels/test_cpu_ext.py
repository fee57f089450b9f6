"""The packed CPU GEMV (kernels/cpu_gemv.cpp, built by kernels/cpu_ext.py) against the reference decode,
and its place in `cpu.linear`: decode-sized inputs take it, prefill and what it does not cover keep the
int4 (tinygemm) path, and a failed build falls back to tinygemm."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import layer, pbllm_layer
from torch.utils import cpp_extension

from compress import format as fmt
from compress.kernels import cpu, cpu_ext, reference
from compress.plan import LayerSpec

# (K, group size): power-of-two groups, one group per row (None), a narrower last group (200 = 3·64 + 8) and
# a group size that is not a multiple of 32 (the portable path).
GROUPS = [(576, 32), (576, 64), (576, 128), (576, None), (200, 64), (200, None), (200, 40)]
SCALES = (torch.float16, torch.bfloat16, torch.float32)
N = 37  # not a multiple of the kernel's 4-row blocks


@pytest.fixture(scope="module")
def ext():
    if cpu_ext._compiler() is None or not cpp_extension.is_ninja_available():
        pytest.skip("no C++ compiler or ninja: the CPU GEMV extension cannot be built here")
    e = cpu_ext.load()  # the first call compiles (tens of seconds), later ones load the cached build
    assert e is not None, cpu_ext.unavailable_reason()
    return e


def packed(bits: int, K: int, g: int, sym: bool, sdt: torch.dtype, seed: int = 0):
    """Random codes of width `bits` packed as format.py stores them, with scales and zero points."""
    gen = torch.Generator().manual_seed(seed)
    G = math.ceil(K / g)
    codes = torch.randint(0, 2**bits, (N, K), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(N, G, generator=gen) * 0.1 + 0.01).to(sdt)
    zero = None if sym else torch.randint(0, 2**bits, (N, G), generator=gen, dtype=torch.uint8)
    return codes, fmt.pack(codes, bits), scale, zero


def magnitude(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
              g: int) -> torch.Tensor:
    """Σ_k |x| s (code + z): what fp32 rounding of the kernel's sums is relative to, [M, N]."""
    K = codes.shape[1]
    z = reference.zeros_for(scale, zero, bits)
    w = scale.float().repeat_interleave(g, dim=1)[:, :K] * (codes.float() + z.repeat_interleave(g, dim=1)[:, :K])
    return x.float().abs() @ w.T


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(("K", "g"), GROUPS, ids=[f"K{k}-g{g or 'row'}" for k, g in GROUPS])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_gemv_matches_the_reference(ext, bits: int, K: int, g: int | None, sym: bool) -> None:
    g = g or K
    for sdt, xdt, M in itertools.product(SCALES, (torch.float32, torch.bfloat16), (1, 3)):
        codes, qweight, scale, zero = packed(bits, K, g, sym, sdt)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(xdt)
        y = cpu_ext.wq_gemv(x, qweight, scale, zero, bits, g)
        ref = reference.wq_matmul(x.float(), qweight, scale, zero, bits, g)  # fp32, on the same (rounded) x
        mag = magnitude(x, codes, scale, zero, bits, g)
        case = (bits, K, g, sym, sdt, xdt, M)
        assert y.shape == (M, N) and y.dtype == xdt, case
        err = (y.float() - ref).abs()
        if xdt == torch.float32:  # fp32 accumulation in another order: rounding of the sums only
            assert (y - ref).norm() <= 1e-5 * ref.norm(), case
            assert (err <= 1e-5 * mag).all(), case
        else:  # plus the rounding of the output to bf16
            assert (err <= 2**-8 * ref.abs() + 1e-5 * mag).all(), case


@pytest.mark.parametrize(("K", "g"), GROUPS, ids=[f"K{k}-g{g or 'row'}" for k, g in GROUPS])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_the_identity_and_the_decoder_read_the_weights_back_exactly(ext, bits: int, K: int, g: int | None) -> None:
    """The GEMV on the identity, and the C++ decoder (in every output dtype, and on a tile of rows), give the
    reference decode bit for bit."""
    g = g or K
    for sym, sdt in itertools.product((True, False), SCALES):
        _, qweight, scale, zero = packed(bits, K, g, sym, sdt, seed=1)
        W = reference.dequantize(qweight, scale, zero, bits, g, K)
        case = (bits, K, g, sym, sdt)
        y = cpu_ext.wq_gemv(torch.eye(K), qweight, scale, zero, bits, g)
        assert torch.equal(y.T, W), case
        assert torch.equal(cpu_ext.wq_dequant(qweight, scale, zero, bits, g, K), W), case
        for dt in (torch.bfloat16, torch.float16):  # one rounding of the fp32 value
            assert torch.equal(cpu_ext.wq_dequant(qweight, scale, zero, bits, g, K, dt), W.to(dt)), case
        rows = cpu_ext.wq_dequant(qweight[5:9], scale[5:9], None if zero is None else zero[5:9], bits, g, K)
        assert torch.equal(rows, W[5:9]), case  # a tile of rows (strided views)


def test_leading_dims_bias_and_bad_widths(ext) -> None:
    _, qweight, scale, zero = packed(4, 576, 128, False, torch.float16)
    x, bias = torch.randn(2, 3, 576), torch.randn(N)
    y = cpu_ext.wq_gemv(x, qweight, scale, zero, 4, 128, bias)
    ref = reference.wq_matmul(x.reshape(6, 576), qweight, scale, zero, 4, 128) + bias
    assert y.shape == (2, 3, N)
    assert (y.reshape(6, N) - ref).norm() <= 1e-5 * ref.norm()
    with pytest.raises(RuntimeError, match="widths 1 to 8 only"):
        ext.wq_gemv(torch.randn(1, 64), torch.zeros(N, 2 * 9, dtype=torch.int32), scale[:, :1], torch.empty(0), 9, 64)
    with pytest.raises(RuntimeError, match="qweight has"):
        ext.wq_gemv(torch.randn(1, 64), qweight, scale, zero, 4, 128)


def test_rows_split_over_threads_give_the_same_bits(ext) -> None:
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (203, 576), generator=gen, dtype=torch.uint8)  # 51 blocks of 4 rows: two tasks
    qweight, scale = fmt.pack(codes, 4), torch.rand(203, 5, generator=gen).half()
    x = torch.randn(1, 576, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_ext.wq_gemv(x, qweight, scale, None, 4, 128)
        torch.set_num_threads(2)
        two = cpu_ext.wq_gemv(x, qweight, scale, None, 4, 128)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


MIXED = LayerSpec(bits=(2, 4, 3, 2, 4), group_size=128, symmetric=False)  # K = 576: five groups, three widths


def no_int4_copy(layer: object) -> cpu.Prepared:
    raise AssertionError("cpu.prepare ran: an int4 (tinygemm) copy of the layer was made")


def int4_copies(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The layers `cpu.prepare` makes an int4 copy of from now on, in order."""
    made, real = [], cpu.prepare

    def spy(layer: object) -> cpu.Prepared:
        made.append(layer)
        return real(layer)

    monkeypatch.setattr(cpu, "prepare", spy)
    return made


@pytest.mark.parametrize("spec", [MIXED, LayerSpec(bits=3, group_size=64, symmetric=True),
                                  LayerSpec(bits=4, group_size=48, symmetric=False)],
                         ids=["mixed", "b3-g64-sym", "b4-g48"])
@pytest.mark.parametrize("M", [1, 3])
def test_cpu_linear_takes_the_gemv_for_few_rows(ext, spec: LayerSpec, M: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "prepare", no_int4_copy)
    m = layer(spec)
    assert cpu.unsupported(m) is None  # g = 48 too: tinygemm cannot, the GEMV can
    assert cpu.gemv_unsupported(m) is None
    x = torch.randn(2, M, 576)
    assert cpu.path(m, x) == "gemv" and cpu.path(m, x.bfloat16()) == "gemv"
    exact = x @ m.dequantize().T + m.bias
    y = cpu.linear(m, x)
    assert y.shape == exact.shape and y.dtype == torch.float32
    assert (y - exact).norm() <= 1e-5 * exact.norm()  # fp32 in, fp32 accumulation: exact up to order
    yb = cpu.linear(m, x.bfloat16())
    ref_b = x.bfloat16().float() @ m.dequantize().T + m.bias
    assert yb.dtype == torch.bfloat16
    assert ((yb.float() - ref_b).abs() <= 2**-8 * ref_b.abs() + 1e-5 * ref_b.abs().amax()).all()


def test_prefill_and_uncovered_layers_keep_the_int4_path(ext, monkeypatch: pytest.MonkeyPatch) -> None:
    made = int4_copies(monkeypatch)
    m = layer(MIXED)
    x = torch.randn(cpu.GEMV_ROWS + 4, 576)
    assert cpu.path(m, x.bfloat16()) == "int4"  # prefill: tinygemm
    y = cpu.linear(m, x.bfloat16()).float()
    assert made == [m]  # its int4 copy, made once
    exact = x.bfloat16().float() @ m.dequantize().T + m.bias
    assert (y - exact).norm() / exact.norm() < 1e-2
    odd = layer(LayerSpec(bits=4, group_size=48, symmetric=False))
    assert cpu.path(odd, x.bfloat16()) == "tiles"  # tinygemm cannot take g = 48: the C++ decoder + one matmul
    y = cpu.linear(odd, x.bfloat16()).float()
    exact = x.bfloat16().float() @ odd.dequantize().T + odd.bias
    assert ((y - exact).abs() <= 2**-8 * exact.abs() + 1e-5 * exact.abs().amax()).all()
    one_bit = layer(LayerSpec(bits=1, group_size=128, symmetric=False))
    assert cpu.gemv_unsupported(one_bit) is None and cpu.path(one_bit, x[:1].bfloat16()) == "gemv"  # 1 bit: the GEMV
    y = cpu.linear(one_bit, x[:1].bfloat16()).float()
    exact = x[:1].bfloat16().float() @ one_bit.dequantize().T + one_bit.bias
    assert ((y - exact).abs() <= 2**-8 * exact.abs() + 1e-5 * exact.abs().amax()).all()
    assert made == [m]  # neither odd nor one_bit made an int4 copy


def test_autograd_gets_the_bias_gradient_and_the_input_gradient(ext) -> None:
    m = layer(LayerSpec(bits=4, group_size=128, symmetric=False))
    x = torch.randn(2, 576)
    with torch.no_grad():
        fast = cpu.linear(m, x)  # the bias goes into the kernel
    y = cpu.linear(m, x)  # m.bias requires grad: added outside, in fp32
    assert torch.equal(y.detach(), fast)
    y.sum().backward()
    assert torch.equal(m.bias.grad, torch.full_like(m.bias, 2.0))
    xg = x.clone().requires_grad_()  # an input that wants a gradient leaves the GEMV for the decoded matmul
    assert cpu.path(m, xg) == "tiles"
    cpu.linear(m, xg).sum().backward()
    torch.testing.assert_close(xg.grad, m.dequantize().sum(0).expand_as(x))
    with pytest.raises(RuntimeError, match="no backward"):
        cpu.gemv_linear(m, xg).sum().backward()  # the GEMV itself still says so


def test_a_failed_build_falls_back_to_tinygemm(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated compiler error")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(cpu_ext, "_compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cpu_ext, "_ext", None)
    monkeypatch.setattr(cpu_ext, "_reason", None)
    monkeypatch.setenv(cpu_ext.CACHE_ENV, str(tmp_path))
    cpu_ext.load.cache_clear()
    try:
        assert cpu_ext.load() is None
        assert "simulated compiler error" in cpu_ext.unavailable_reason()
        m = layer(MIXED)
        x = torch.randn(1, 576)
        assert cpu.unsupported(m) is None  # tinygemm still takes it
        assert "unavailable" in cpu.gemv_unsupported(m) and cpu.path(m, x.bfloat16()) == "int4"
        y = cpu.linear(m, x.bfloat16()).float()
        exact = x.bfloat16().float() @ m.dequantize().T + m.bias
        assert (y - exact).norm() / exact.norm() < 1e-2
        odd = layer(LayerSpec(bits=4, group_size=48, symmetric=False))
        assert "not a multiple of 32" in cpu.unsupported(odd) and "unavailable" in cpu.unsupported(odd)
        assert cpu.path(odd, x) == "decoded"  # no kernel at all: a dense copy, decoded once
        assert torch.equal(cpu.linear(odd, x), F.linear(x, odd.dequantize(), odd.bias))
        with pytest.raises(RuntimeError, match="unavailable"):
            cpu_ext.wq_gemv(x, m.qweight, m.scale, None, 4, 128)
    finally:
        cpu_ext.load.cache_clear()  # the next load() finds the real build again


def test_two_checkouts_of_one_source_build_in_two_directories(tmp_path) -> None:
    """The build directory's tag covers the source's path and bytes and the flags: two checkouts (or venvs) sharing
    one directory would each see another ninja command line and rebuild the extension back and forth."""
    from compress.kernels import jit

    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int f() { return 1; }")
    b.write_text("int f() { return 1; }")
    assert jit.tag([a], "-O3") == jit.tag([a], "-O3")
    assert len({jit.tag([a], "-O3"), jit.tag([b], "-O3"), jit.tag([a], "-O2")}) == 3
    a.write_text("int f() { return 2; }")
    assert jit.tag([a], "-O3") != jit.tag([b], "-O3")


@pytest.mark.parametrize(("salient", "group_size"), [(0.0, -1), (0.05, 128), (0.2, 64), (0.1, 48)],
                         ids=["plain-row", "csr-g128", "bitmask-g64", "g48-portable"])
def test_binary_layers_take_the_gemv_plus_the_salient_correction(ext, salient: float, group_size: int) -> None:
    m = pbllm_layer(salient, N=N, K=576, group_size=group_size)
    assert cpu.unsupported(m) is None
    W = m.dequantize()
    for M, xdt in itertools.product((1, 3), (torch.float32, torch.bfloat16)):
        x = torch.randn(2, M, 576).to(xdt)
        exact = x.float() @ W.T
        y = cpu.linear(m, x)
        assert y.shape == exact.shape and y.dtype == xdt
        if xdt == torch.float32:  # fp32 accumulation: the sums' rounding (and alpha·(s − z') for mu ± alpha)
            assert (y - exact).norm() <= 1e-5 * exact.norm(), (M, xdt)
        else:  # one rounding of the output to bf16
            assert ((y.float() - exact).abs() <= 2**-8 * exact.abs() + 1e-5 * exact.abs().amax()).all(), (M, xdt)
    torch.testing.assert_close(cpu.linear(m, torch.eye(576)[:8]), W.T[:8], rtol=1e-6, atol=1e-7)  # reads Ŵ back
    x = torch.randn(cpu.GEMV_ROWS + 1, 576)
    assert (cpu.linear(m, x) - x @ W.T).norm() <= 1e-5 * (x @ W.T).norm()  # prefill: a dense decode per call


@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
def test_csr_add_matches_a_dense_correction(ext, col_dtype: torch.dtype) -> None:
    """The salient correction alone: ragged rows (empty, shorter and longer than a gather of 8), up to 11 rows
    of x (more than one block of 8), and columns past 32767 (int16 storage is read as uint16)."""
    g = torch.Generator().manual_seed(0)
    N, K = 37, 40000
    D = torch.zeros(N, K)
    for n in range(N):
        k = torch.randperm(K, generator=g)[: [0, 3, 8, 21, 64][n % 5]]
        D[n, k] = torch.randn(len(k), generator=g)
    rows, cols = torch.nonzero(D, as_tuple=True)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), (D != 0).sum(1).cumsum(0)]).to(torch.int32)
    col = cols.to(torch.int32).to(torch.int16) if col_dtype == torch.int16 else cols.to(torch.int32)
    assert col_dtype != torch.int16 or (col < 0).any()  # some columns really wrap
    for M in (1, 8, 11):
        x, y0 = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
        y = cpu_ext.csr_add_(y0.clone(), x, rowptr, col, D[rows, cols])
        torch.testing.assert_close(y, y0 + x.double().mm(D.double().T).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="rowptr must run from 0 to nnz"):
        cpu_ext.csr_add_(y0.clone(), x, rowptr - 1, col, D[rows, cols])


ROUTES = [  # (spec, x dtype, rows) -> the path a default load takes; never the per-call reference
    (LayerSpec(bits=4, group_size=64, symmetric=False), torch.float32, 1, "gemv"),
    (LayerSpec(bits=4, group_size=64, symmetric=False), torch.float32, 20, "tiles"),
    (LayerSpec(bits=4, group_size=64, symmetric=False), torch.float16, 1, "gemv"),
    (LayerSpec(bits=4, group_size=64, symmetric=False), torch.float16, 20, "tiles"),
    (LayerSpec(bits=8, group_size=128, symmetric=False), torch.bfloat16, 1, "gemv"),
    (LayerSpec(bits=8, group_size=128, symmetric=False), torch.bfloat16, 20, "tiles"),
    (LayerSpec(bits=6, group_size=64, symmetric=True), torch.float32, 3, "gemv"),
    (LayerSpec(bits=(8, 3, 4) * 3, group_size=64, symmetric=False), torch.float32, 20, "tiles"),
    (LayerSpec(bits=(8, 3, 4) * 3, group_size=64, symmetric=False), torch.bfloat16, 1, "gemv"),
    (LayerSpec(bits=4, group_size=64, symmetric=False, sparsity=0.5), torch.bfloat16, 20, "int4"),
    (LayerSpec(bits=4, group_size=64, symmetric=False, sparsity=0.5), torch.float32, 20, "decoded"),
    (LayerSpec(bits=3, group_size=-1, symmetric=False, levels=(4, 8, 16) * 192), torch.float32, 1, "decoded"),
]


@pytest.mark.parametrize(("spec", "dtype", "M", "route"), ROUTES,
                         ids=[f"{s.kind}-b{s.bits if isinstance(s.bits, int) else 'mix'}-{str(d)[6:]}-M{m}"
                              for s, d, m, _ in ROUTES])
def test_every_dtype_and_width_has_a_cpu_kernel_that_matches_the_reference(ext, spec: LayerSpec,
                                                                           dtype: torch.dtype, M: int,
                                                                           route: str) -> None:
    from compress import kernels

    m = layer(spec)
    x = torch.randn(M, 576).to(dtype)
    assert kernels.choose(m, x) == "cpu" and cpu.path(m, x) == route
    with torch.no_grad():
        y = m(x)
        ref = F.linear(x.float(), m.dequantize(), m.bias)  # fp32 on the same (rounded) x
    assert y.dtype == dtype and y.shape == ref.shape
    if dtype == torch.float32 and route in ("tiles", "decoded") and isinstance(spec.bits, int):
        assert torch.equal(y, F.linear(x, m.dequantize(), m.bias))  # the reference's own operations
    if route == "int4":  # bf16 scales and activations inside tinygemm
        assert (y.float() - ref).norm() / ref.norm() < 1e-2
        return
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert ((y.float() - ref).abs() <= tol * ref.abs() + 1e-4 * ref.abs().amax()).all()


def test_a_decoded_copy_is_made_once_and_follows_new_codes(ext) -> None:
    m, new = layer(ROUTES[-1][0]), layer(ROUTES[-1][0], seed=1)
    x = torch.randn(3, 576)
    with torch.no_grad():
        m(x)
        W = m.__dict__["_dense"]
        m(x)
        assert m.__dict__["_dense"] is W  # kept
        m.load_state_dict(new.state_dict())
        assert torch.equal(m(x), new(x))


def test_fp64_inputs_keep_the_exact_reference() -> None:
    from compress import kernels

    m = layer(LayerSpec(bits=4, group_size=64, symmetric=False))
    assert kernels.choose(m, torch.randn(1, 576, dtype=torch.float64)) == "reference"


@pytest.mark.parametrize("M", [cpu.GEMV_ROWS + 1, 40])
def test_binary_prefill_decodes_the_1bit_grid_in_tiles(ext, M: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "TILE", 16 * 200)  # several tiles of 16 rows
    m = pbllm_layer(0.1, N=N, K=200, group_size=64)
    x = torch.randn(M, 200)
    assert cpu.path(m, x) == "binary-tiles"
    with torch.no_grad():
        y = m(x)
    ref = x @ m.dequantize().T
    assert (y - ref).norm() <= 1e-5 * ref.norm()
