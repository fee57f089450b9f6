"""The Triton kernel (kernels/triton_wq.py) against the reference decode, on a machine with no GPU.

- Interpreter: TRITON_INTERPRET=1 must be set before the kernel module is imported, and other tests of
  this process import compress.kernels without it, so every interpreter run happens in one subprocess
  (this file run as a script) that returns its measurements as JSON; the tests below assert on them.
- AOT: the kernel is compiled for sm_80 and sm_90 with triton's bundled ptxas (no GPU needed) for every
  width and launch tier, and must fit the shared memory of an A100 / H100 without spilling registers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress import format as fmt
from compress.kernels import reference

triton_wq = pytest.importorskip("compress.kernels.triton_wq")

BITS = range(1, 9)
# (K, group_size): four whole groups; a narrower last group (96 = 64 + 32); two 128-wide K steps of the decode
# tier with a narrow last group; per row with K not a multiple of 32 (ragged last word); a group size that no
# K step divides (scale and zero gathered per element) with a ragged K (80 = 48 + 32)
GROUPS = [(128, 32), (96, 64), (160, 128), (72, 72), (80, 48)]
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
N = 40  # ragged against every BLOCK_N
CASES = [(b, K, g, sym) for b in BITS for K, g in GROUPS for sym in (True, False)]

SMEM_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block: A100 (163 KB), H100 (227 KB)


def case_id(bits: int, K: int, g: int, sym: bool) -> str:
    return f"b{bits}-K{K}-g{g}-{'sym' if sym else 'asym'}"


def random_layer(bits: int, K: int, g: int, sym: bool, n: int, scale_dtype: torch.dtype, seed: int):
    """(qweight, scale, zero) of a random packed layer [n, K]: codes, scales and zero points all random."""
    gen = torch.Generator().manual_seed(seed)
    G = math.ceil(K / g)
    codes = torch.randint(0, 2**bits, (n, K), generator=gen).to(torch.uint8)
    scale = ((torch.rand(n, G, generator=gen) + 0.5) * 0.02).to(scale_dtype)
    zero = None if sym else torch.randint(0, 2**bits, (n, G), generator=gen).to(torch.uint8)
    return fmt.pack(codes, bits), scale, zero


# binary layers: name -> (K, group_size, salient fraction)
BINARY_CASES = {"K128-g32-10%": (128, 32, 0.1), "K200-g48-20%": (200, 48, 0.2), "K77-row-0%": (77, 77, 0.0),
                "K96-row-100%": (96, 96, 1.0)}


def random_binary_layer(N: int, K: int, g: int, frac: float, scale_dtype: torch.dtype, seed: int):
    """(signs, alpha, mu, rowptr, col, delta): the kernel operands of a random binary layer."""
    gen = torch.Generator().manual_seed(seed)
    G = math.ceil(K / g)
    signs = fmt.pack(torch.randint(0, 2, (N, K), generator=gen).to(torch.uint8), 1)
    alpha = (torch.rand(N, G, generator=gen) * 0.02 + 0.001).to(scale_dtype)
    mu = (torch.randn(N, G, generator=gen) * 0.005).to(scale_dtype)
    mask = torch.rand(N, K, generator=gen) < frac
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)]).to(torch.int32)
    col = torch.nonzero(mask)[:, 1].to(torch.int32)
    return signs, alpha, mu, rowptr, col, torch.randn(len(col), generator=gen) * 0.05


# --- the interpreter worker (runs in a subprocess with TRITON_INTERPRET=1) -------------------------------

def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def _interpreter_measurements() -> dict[str, object]:
    tw = triton_wq
    out: dict[str, object] = {"interpreted": tw.INTERPRETED, "available": tw.available()}

    # every width x group layout x sym/asym, fp32 activations: x = [I_K; 3 random rows] (M > 16, the prefill
    # tier) decodes Ŵᵀ exactly and checks a matmul; one random row (M = 1, the decode tier) checks decode
    for i, (bits, K, g, sym) in enumerate(CASES):
        qw, scale, zero = random_layer(bits, K, g, sym, N, SCALE_DTYPES[i % 3], seed=i)
        W = reference.dequantize(qw, scale, zero, bits, g, K)  # fp32 [N, K]
        x = torch.cat([torch.eye(K), torch.randn(3, K)])
        y = tw.wq_matmul(x, qw, scale, zero, bits, g)
        x1 = torch.randn(1, K)
        y1 = tw.wq_matmul(x1, qw, scale, zero, bits, g)
        out[case_id(bits, K, g, sym)] = {
            "exact_decode": bool(torch.equal(y[:K], W.T)),
            "matmul_err": _rel_err(y[K:], reference.wq_matmul(x[K:], qw, scale, zero, bits, g)),
            "gemv_err": _rel_err(y1, reference.wq_matmul(x1, qw, scale, zero, bits, g)),
            "dtype_shape": [str(y.dtype), list(y.shape), str(y1.dtype), list(y1.shape)],
        }

    # fp16 activations take the GPU code path (Ŵ rounded to fp16, fp16 tl.dot): three-way tolerance against
    # PyTorch's own fp16 matmul of the same Ŵ, for M = 1 (decode tier) and M = 20 (prefill tier), N = 72
    for bits in BITS:
        for M in (1, 20):
            qw, scale, zero = random_layer(bits, 192, 64, bits % 2 == 0, 72, torch.float16, seed=100 + bits)
            W = reference.dequantize(qw, scale, zero, bits, 64, 192)
            x = torch.randn(M, 192).half()
            exact = x.float() @ W.T
            y = tw.wq_matmul(x, qw, scale, zero, bits, 64)
            out[f"fp16-b{bits}-M{M}"] = {"dtype": str(y.dtype), "err": _rel_err(y, exact),
                                          "torch_err": _rel_err(x @ W.half().T, exact)}

    # bf16 activations (computed in fp32 under the interpreter, rounded once by PyTorch), with leading dims
    qw, scale, zero = random_layer(5, 160, 32, False, N, torch.bfloat16, seed=200)
    x = torch.randn(2, 3, 160).bfloat16()
    y = tw.wq_matmul(x, qw, scale, zero, 5, 32)
    ref = reference.wq_matmul(x.reshape(6, 160), qw, scale, zero, 5, 32).reshape(2, 3, N)
    ulps = ((y.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30) * 2**7).max().item()
    out["bf16"] = {"dtype": str(y.dtype), "shape": list(y.shape), "max_ulps": ulps}

    # a column slice of a wider qweight (how the width parts of a mixed layer arrive): rows stride_qw apart, and
    # the random words after each row's own must never be read
    qw, scale, zero = random_layer(3, 100, 32, False, N, torch.float16, seed=250)
    junk = torch.randint(-2**31, 2**31 - 1, (N, 5), dtype=torch.int32)
    sliced = torch.cat([qw, junk], dim=1)[:, : qw.shape[1]]
    x = torch.cat([torch.eye(100), torch.randn(2, 100)])
    y = tw.wq_matmul(x, sliced, scale, zero, 3, 32)
    out["sliced"] = {"contiguous": sliced.is_contiguous(),
                     "exact_decode": bool(torch.equal(y[:100], reference.dequantize(qw, scale, zero, 3, 32, 100).T))}

    # the FP32 tier's tiles (what fp32 activations launch on a GPU), forced through `config`
    for bits in (1, 3, 8):
        for K, g in ((96, 64), (100, 48)):
            qw, scale, zero = random_layer(bits, K, g, False, N, torch.float16, seed=300 + bits)
            x = torch.cat([torch.eye(K), torch.randn(2, K)])
            y = tw.wq_matmul(x, qw, scale, zero, bits, g, config=tw.FP32)
            out[f"fp32-tier-b{bits}-K{K}-g{g}"] = {
                "exact_decode": bool(torch.equal(y[:K], reference.dequantize(qw, scale, zero, bits, g, K).T)),
                "matmul_err": _rel_err(y[K:], reference.wq_matmul(x[K:], qw, scale, zero, bits, g))}

    # binary layers: the 1-bit pass (mu + alpha·sign) and the salient CSR correction, decode (x = I) and matmul,
    # M = 1 and M = 20, fp32 and fp16 activations
    for name, (K, g, frac) in BINARY_CASES.items():
        ops = random_binary_layer(N, K, g, frac, torch.float16, seed=400 + K)
        W = reference.binary_dequantize(ops[0], ops[1], ops[2], g, K, *ops[3:])
        xI = torch.cat([torch.eye(K), torch.randn(20, K)])
        y = tw.binary_matmul(xI, *ops[:3], g, *ops[3:])
        x1 = torch.randn(1, K)
        xh = torch.randn(20, K).half()
        yh = tw.binary_matmul(xh, *ops[:3], g, *ops[3:])
        exact = xh.float() @ W.T
        out[f"binary-{name}"] = {
            "decode_err": (y[:K] - W.T).abs().max().item(),
            "matmul_err": _rel_err(y[K:], reference.binary_matmul(xI[K:], *ops[:3], g, *ops[3:])),
            "gemv_err": _rel_err(tw.binary_matmul(x1, *ops[:3], g, *ops[3:]),
                                 reference.binary_matmul(x1, *ops[:3], g, *ops[3:])),
            "fp16": [str(yh.dtype), _rel_err(yh, exact), _rel_err(xh @ W.half().T, exact)]}

    # through the dispatcher: CompressedLinear layers (uniform and mixed widths) forced onto the triton backend
    from compress import kernels
    from compress.nn import CompressedLinear
    from compress.plan import LayerSpec, LayerWeight
    from compress.round import rtn

    os.environ[kernels.ENV] = "triton"
    specs = {"w4-g128-asym": LayerSpec(bits=4, group_size=128, symmetric=False),
             "w3-row-sym": LayerSpec(bits=3, group_size=-1, symmetric=True),
             "mixed-2-4-3-2-4": LayerSpec(bits=(2, 4, 3, 2, 4), group_size=128, symmetric=False)}
    for name, spec in specs.items():
        gen = torch.Generator().manual_seed(7)
        lw = rtn.apply(LayerWeight(torch.randn(N, 576, generator=gen) * 0.05, spec), None, rtn.Config())
        layer = CompressedLinear.from_weight(lw, torch.randn(N, generator=gen))
        x = torch.randn(3, 576, generator=gen)
        y = kernels.linear(layer, x)
        out[f"dispatch-{name}"] = {"backend": kernels.choose(layer, x),
                                   "err": _rel_err(y, x @ layer.dequantize().T + layer.bias)}

    # a PB-LLM layer (binary + 10 % salient, CSR or bitmask index, plain or MST-stored signs) through the dispatcher
    from compress.round import pbllm

    for signs in ("plain", "mst"):
        gen = torch.Generator().manual_seed(8)
        W = torch.randn(N, 576, generator=gen) * 0.05
        if signs == "mst":  # rows that are near copies of one row: their signs' tree is smaller than the plane
            W = W[:1] + 1e-3 * torch.randn(N, 576, generator=gen)
        spec = LayerSpec(bits=1, group_size=-1, symmetric=False, binary=True, salient=0.1)
        X = torch.randn(256, 576, generator=gen)
        cfg = pbllm.Config(metric="magnitude", feedback=False, signs="auto" if signs == "mst" else "plain")
        lw = pbllm.apply(LayerWeight(W, spec), X.T @ X / 256, cfg)
        layer = CompressedLinear.from_weight(lw, None)
        x = torch.randn(3, 576, generator=gen)
        y = kernels.linear(layer, x)
        out[f"dispatch-pbllm-{signs}"] = {"backend": kernels.choose(layer, x), "signs": layer.spec.signs,
                                          "err": _rel_err(y, x @ layer.dequantize().T)}
    return out


@pytest.fixture(scope="module")
def interp() -> dict[str, object]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("COMPRESS_KERNEL", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True,
                          timeout=900, cwd=Path(__file__).resolve().parent)
    assert proc.returncode == 0, f"the interpreter worker failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- interpreter results ---------------------------------------------------------------------------------

def test_the_worker_ran_the_interpreter(interp: dict) -> None:
    assert interp["interpreted"] is True
    assert interp["available"] is True


@pytest.mark.parametrize(("bits", "K", "g", "sym"), CASES, ids=[case_id(*c) for c in CASES])
def test_decodes_exactly_and_matches_the_reference(interp: dict, bits: int, K: int, g: int, sym: bool) -> None:
    r = interp[case_id(bits, K, g, sym)]
    assert r["exact_decode"], "x = I must give Ŵᵀ bit for bit (unpack + dequantize in fp32)"
    assert r["matmul_err"] <= 1e-5, r
    assert r["gemv_err"] <= 1e-5, r
    assert r["dtype_shape"] == ["torch.float32", [K + 3, N], "torch.float32", [1, N]]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("M", [1, 20])
def test_fp16_activations_within_twice_torch_fp16_error(interp: dict, bits: int, M: int) -> None:
    r = interp[f"fp16-b{bits}-M{M}"]
    assert r["dtype"] == "torch.float16"
    assert r["err"] <= 2 * r["torch_err"] + 1e-3, r


def test_bf16_activations_round_once(interp: dict) -> None:
    r = interp["bf16"]
    assert r["dtype"] == "torch.bfloat16" and r["shape"] == [2, 3, N]
    assert r["max_ulps"] <= 1.0, r  # the fp32 results may round to neighbouring bf16 values, never further


def test_column_slice_of_qweight_reads_only_its_words(interp: dict) -> None:
    assert interp["sliced"] == {"contiguous": False, "exact_decode": True}


@pytest.mark.parametrize("key", [f"fp32-tier-b{b}-K{K}-g{g}" for b in (1, 3, 8) for K, g in ((96, 64), (100, 48))])
def test_fp32_tier_tiles(interp: dict, key: str) -> None:
    r = interp[key]
    assert r["exact_decode"] and r["matmul_err"] <= 1e-5, r


@pytest.mark.parametrize("name", ["w4-g128-asym", "w3-row-sym", "mixed-2-4-3-2-4"])
def test_dispatcher_runs_compressed_linear_on_triton(interp: dict, name: str) -> None:
    r = interp[f"dispatch-{name}"]
    assert r["backend"] == "triton"
    assert r["err"] <= 1e-5, r


@pytest.mark.parametrize("name", list(BINARY_CASES))
def test_binary_kernel_matches_the_reference(interp: dict, name: str) -> None:
    r = interp[f"binary-{name}"]
    assert r["decode_err"] <= 1e-7, r  # x = I gives Ŵᵀ up to the fp32 rounding of mu + alpha·s + delta
    assert r["matmul_err"] <= 1e-5 and r["gemv_err"] <= 1e-5, r
    dtype, err, torch_err = r["fp16"]
    assert dtype == "torch.float16" and err <= 2 * torch_err + 1e-3, r


@pytest.mark.parametrize("signs", ["plain", "mst"])
def test_dispatcher_runs_pbllm_layers_on_triton(interp: dict, signs: str) -> None:
    r = interp[f"dispatch-pbllm-{signs}"]
    assert r["backend"] == "triton" and r["err"] <= 1e-5, r
    assert r["signs"] == ("mst" if signs == "mst" else ""), r


# --- in this process (no interpreter) --------------------------------------------------------------------

def test_choose_config_keeps_steps_inside_groups() -> None:
    for fp32_dot in (False, True):
        for M in (1, 16, 17, 300):
            tier = triton_wq.FP32 if fp32_dot else triton_wq.DECODE if M <= 16 else triton_wq.PREFILL
            for K in (32, 100, 576, 4096):
                for g in [*range(1, 70), 96, 128, 192, 256, 4096]:
                    cfg, one_group = triton_wq.choose_config(M, K, g, fp32_dot)
                    bk = cfg.block_k
                    assert (cfg.block_m, cfg.block_n) == (tier.block_m, tier.block_n)
                    assert bk >= 32 and bk & (bk - 1) == 0 and bk <= tier.block_k
                    if one_group:  # every step [k0, k0 + bk) is inside group k0 // g
                        assert g >= K or g % bk == 0
                    else:  # no step size of the tier divides g: the kernel gathers per element
                        assert g < K and all(g % b for b in triton_wq.BLOCK_KS if b <= tier.block_k)


def test_rejects_what_it_does_not_support() -> None:
    qw, scale, zero = random_layer(4, 64, 32, False, 8, torch.float16, seed=0)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="bits=9"):
        triton_wq.wq_matmul(x, qw, scale, zero, 9, 32)
    with pytest.raises(ValueError, match="group_size=0"):
        triton_wq.wq_matmul(x, qw, scale, zero, 4, 0)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        triton_wq.wq_matmul(x.double(), qw, scale, zero, 4, 32)
    with pytest.raises(ValueError, match="uint8"):
        triton_wq.wq_matmul(x, qw, scale, zero.int(), 4, 32)
    with pytest.raises(ValueError, match="qweight must be int32"):
        triton_wq.wq_matmul(x, qw[:, :-1], scale, zero, 4, 32)
    with pytest.raises(ValueError, match="scale/zero must be"):
        triton_wq.wq_matmul(x, qw, scale, zero, 4, 64)
    if not triton_wq.INTERPRETED and not torch.cuda.is_available():
        assert not triton_wq.available()
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            triton_wq.wq_matmul(x, qw, scale, zero, 4, 32)


def _ptxas_or_skip() -> None:
    if triton_wq.INTERPRETED:
        pytest.skip("this process imported the kernel under TRITON_INTERPRET=1: no compiled kernel to build")
    try:
        import triton

        tools = (triton.knobs.nvidia.ptxas.path, triton.knobs.nvidia.cuobjdump.path)
    except Exception as e:  # the tool lookup raises when the binary is absent
        pytest.skip(f"triton's ptxas/cuobjdump are not available: {e}")
    if not all(os.path.exists(t) for t in tools):
        pytest.skip(f"triton's ptxas/cuobjdump are missing: {tools}")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("tier", ["decode", "prefill", "fp32"])
def test_aot_build_fits_shared_memory_without_spills(arch: int, tier: str) -> None:
    """Every width of a launch tier, in its heaviest variant (asymmetric, scale/zero gathered per element)."""
    _ptxas_or_skip()
    config = triton_wq.CONFIGS[tier]
    x_dtype = torch.float32 if tier == "fp32" else torch.float16
    for bits in BITS:
        info = triton_wq.compile_for(arch, bits, config, x_dtype=x_dtype, group_size=48, tile_in_one_group=False)
        assert 0 < info.shared <= SMEM_LIMIT[arch], info
        assert info.n_spills == 0, info
        assert 0 < info.n_regs <= 255, info
        if tier != "fp32":  # fp16 tiles run on the tensor cores; the fp32 (ieee) dot is FMA only
            assert info.n_mma > 0, info


@pytest.mark.parametrize("arch", [80, 90])
def test_aot_group_aligned_steps_build_too(arch: int) -> None:
    """The one-(scale, zero)-per-step variant at the widest steps, symmetric and asymmetric, bf16."""
    _ptxas_or_skip()
    for bits in (7, 8):
        for sym in (True, False):
            info = triton_wq.compile_for(arch, bits, triton_wq.DECODE, x_dtype=torch.bfloat16,
                                         scale_dtype=torch.bfloat16, symmetric=sym, group_size=128)
            assert 0 < info.shared <= SMEM_LIMIT[arch] and info.n_spills == 0 and info.n_mma > 0, info


@pytest.mark.parametrize("arch", [80, 90])
def test_aot_binary_kernels_build_without_spills(arch: int) -> None:
    """The binary specialization in every tier (gathered alpha/mu), and the salient correction kernel."""
    _ptxas_or_skip()
    for tier, config in triton_wq.CONFIGS.items():
        x_dtype = torch.float32 if tier == "fp32" else torch.bfloat16
        info = triton_wq.compile_for(arch, 1, config, x_dtype=x_dtype, scale_dtype=torch.bfloat16, group_size=48,
                                     tile_in_one_group=False, binary=True)
        assert 0 < info.shared <= SMEM_LIMIT[arch] and info.n_spills == 0, info
        assert tier == "fp32" or info.n_mma > 0, info
    info = triton_wq.compile_correction_for(arch)
    assert info.shared <= SMEM_LIMIT[arch] and info.n_spills == 0 and 0 < info.n_regs <= 128, info


if __name__ == "__main__":  # the interpreter worker: TRITON_INTERPRET=1 is set by the `interp` fixture
    print(json.dumps(_interpreter_measurements()))
