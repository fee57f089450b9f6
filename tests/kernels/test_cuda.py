"""The CUDA batch-1 GEMV (kernels/cuda) on a machine without a GPU.

1. nvcc compiles every kernel the extension launches for sm_80 and sm_90 with no spills, no local memory
   and no shared memory (ptxas -v), and the ptxas parser sees spills when there are some.
2. unpack.cuh, the layout walk shared by the kernel and the host, run on the host through a g++ driver:
   its codes equal format.unpack exactly, its dequantized values equal reference.dequantize exactly, and
   the kernel's chunk walk (lanes, masked group segments, xor-butterfly reduction) gives reference y,
   for every width 1..8, K not a multiple of 32, groups that straddle chunks, per-row groups.
   The extension source itself (wq_gemv.cu, binding included) compiles for both (slow: torch headers).
3. build.load() returns None here (CPU torch), caches its answer, never raises (even when the build
   itself throws), and build.wq_gemv says why it cannot run.
"""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch

from compress import format as fmt
from compress.kernels import reference
from compress.kernels.cuda import build

# --- 1. nvcc compile check ------------------------------------------------------------------------------

KERNELS = {f"gemv_kernel<{x}, {b}>" for x in ("fp16", "bf16", "fp32") for b in (2, 3, 4, "binary")}


@pytest.fixture(scope="module")
def nvcc_reports() -> dict[int, dict]:
    if build.nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): CUDA compile check skipped")
    return {arch: build.nvcc_check(arch) for arch in build.ARCHS}  # one nvcc call per architecture


@pytest.mark.parametrize("arch", build.ARCHS)
def test_kernels_compile_without_spills(nvcc_reports: dict[int, dict], arch: int) -> None:
    r = nvcc_reports[arch]
    assert r["ok"], f"nvcc failed for sm_{arch}:\n{r['log'][-3000:]}"
    assert set(r["kernels"]) == KERNELS, f"ptxas reported {sorted(r['kernels'])}"
    for name, k in r["kernels"].items():
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, f"{name} spills on sm_{arch}: {k}"
        # no local memory at all: a dynamically indexed register array (e.g. the activations of a chunk)
        # would land in a stack frame without being counted as a spill
        assert k["stack"] == 0, f"{name} uses {k['stack']} bytes of local memory on sm_{arch}"
        assert k["smem"] == 0 and k["barriers"] == 0, f"{name}: the GEMV is designed without shared memory: {k}"
        # 128 threads per block: <= 96 registers keeps >= 5 blocks (20 warps) per SM for latency hiding
        assert 16 <= k["registers"] <= 96, f"{name} uses {k['registers']} registers on sm_{arch}"


def test_parse_ptxas_reads_spills_and_smem() -> None:
    text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN2wq11gemv_kernelI6__halfLi3EEEvPKT_PKjlPKvilPKhlPS2_iii' for 'sm_80'
ptxas info    : Function properties for _ZN2wq11gemv_kernelI6__halfLi3EEEvPKT_PKjlPKvilPKhlPS2_iii
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 436 bytes cmem[0]
ptxas info    : Function properties for _ZN2wq11plane_shiftEii
    16 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads
ptxas info    : Compiling entry function '_ZN2wq11gemv_kernelIfLi4EEEvPKT_PKjlPKvilPKhlPS1_iii' for 'sm_80'
ptxas info    : Function properties for _ZN2wq11gemv_kernelIfLi4EEEvPKT_PKjlPKvilPKhlPS1_iii
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 436 bytes cmem[0]
"""
    k = build.parse_ptxas(text)
    assert k == {
        "gemv_kernel<fp16, 3>": {"registers": 255, "spill_stores": 8, "spill_loads": 12, "stack": 24, "smem": 2048,
                                 "barriers": 1},
        "gemv_kernel<fp32, 4>": {"registers": 40, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0,
                                 "barriers": 0},
    }  # the non-entry function's properties are not attributed to any kernel


def test_toolkit_root_sees_through_the_nvcc_wrapper() -> None:
    path = build.nvcc()
    if path is None:
        pytest.skip("nvcc not found")
    # torch guesses CUDA_HOME = dirname(dirname(which nvcc)), i.e. /usr/local for a /usr/local/bin wrapper
    assert (build._toolkit_root(path) / "include" / "cuda_runtime.h").is_file()


# --- 2. host-side unpack / dequant / walk ---------------------------------------------------------------

@pytest.fixture(scope="module")
def host_driver(tmp_path_factory: pytest.TempPathFactory) -> str:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++/c++) for the host unpack test")
    exe = tmp_path_factory.mktemp("cuda_host") / "unpack_host_test"
    src = build.HERE / "unpack_host_test.cpp"
    proc = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"g++ failed:\n{proc.stderr[-3000:]}"
    return str(exe)


def _u32(t: torch.Tensor) -> list[int]:
    """int32 / fp32 tensor -> its 32-bit patterns as non-negative ints."""
    return (t.contiguous().view(torch.int32).flatten().to(torch.int64) & 0xFFFFFFFF).tolist()


def _f32(vals: list[int]) -> torch.Tensor:
    t = torch.tensor(vals, dtype=torch.int64)
    return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32).view(torch.float32)


def _run_driver(exe: str, qweight, scale, zero, x, bits: int, K: int, group_size: int) -> dict[str, list[int]]:
    N = qweight.shape[0]
    parts = [bits, N, K, group_size, int(zero is None), *_u32(qweight), *_u32(scale)]
    if zero is not None:
        parts += zero.flatten().tolist()
    parts += _u32(x)
    proc = subprocess.run([exe], input=" ".join(map(str, parts)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = {}
    for line in proc.stdout.splitlines():
        tag, *vals = line.split()
        out[tag] = [int(v) for v in vals]
    return out


# (N, K, group_size, symmetric). C = 32 / widest plane: 16 codes per chunk at 2-3 bits, 8 at 4-7, 32 at 1, 4 at 8.
CASES = [
    (5, 200, 64, False),  # K % 32 = 8: a partial last word and (for C = 16) a partial last chunk
    (3, 77, 24, True),  # groups of 24 straddle 16-code chunks; narrower last group (77 = 3·24 + 5)
    (4, 150, 5, False),  # several groups inside one chunk
    (3, 45, 45, False),  # one group per row (per-row grid), K < 64
]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize(("N", "K", "group_size", "symmetric"), CASES)
def test_host_unpack_matches_format(host_driver: str, bits: int, N: int, K: int, group_size: int,
                                    symmetric: bool) -> None:
    g = torch.Generator().manual_seed(1000 * bits + K)
    G = math.ceil(K / group_size)
    codes = torch.randint(0, 2**bits, (N, K), generator=g).to(torch.uint8)
    qweight = fmt.pack(codes, bits)
    assert qweight.shape == (N, fmt.packed_words(K, bits))
    scale = (torch.rand(N, G, generator=g) * 0.05 + 0.001).half().float()  # fp16-representable, as stored
    zero = None if symmetric else torch.randint(0, 2**bits, (N, G), generator=g).to(torch.uint8)
    x = torch.randn(K, generator=g)

    out = _run_driver(host_driver, qweight, scale, zero, x, bits, K, group_size)

    expected = fmt.unpack(qweight, bits, K)
    assert torch.equal(expected, codes)
    for tag in ("codes", "chunk", "f1p"):  # generic accessor, the kernel's decoder, its mantissa decoder
        got = torch.tensor(out[tag], dtype=torch.int64).view(N, K)
        assert torch.equal(got, expected.to(torch.int64)), f"{tag} differs from format.unpack"

    W = reference.dequantize(qweight, scale, zero, bits, group_size, K)
    assert torch.equal(_f32(out["deq"]).view(N, K), W), "dequant differs from reference.dequantize"

    # y through the kernel's walk, against fp64 (W is exact in fp32). The chunk formula
    # s·(2^b·A − (2^b + z)·X) carries terms of size s·|x|·(2^b + z): allow a few ulps of those sums.
    y = _f32(out["y"])
    y64 = x.double() @ W.double().T
    zeros = reference.zeros_for(scale, zero, bits).repeat_interleave(group_size, dim=1)[:, :K].double()
    scales = scale.double().repeat_interleave(group_size, dim=1)[:, :K]
    magnitude = (scales * (2**bits + zeros) + W.double().abs()) @ x.double().abs()
    err = (y.double() - y64).abs()
    assert (err <= 8 * torch.finfo(torch.float32).eps * magnitude + 1e-30).all(), \
        f"max error {err.max():.3g}, bound {(8 * torch.finfo(torch.float32).eps * magnitude).min():.3g}"
    # ... and it is the reference matmul's answer to fp32 accuracy
    y_ref = reference.wq_matmul(x[None], qweight, scale, zero, bits, group_size)[0]
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4 * float(magnitude.max()) / K**0.5)


# binary layers: (N, K, group_size, salient fraction). Groups of 32 (one word each), 48 (straddling words),
# per row with a ragged last word; no salient weights, a few, every weight of some rows.
BINARY_CASES = [(6, 128, 32, 0.1), (5, 200, 48, 0.2), (4, 77, 77, 0.0), (3, 96, 96, 1.0)]


def random_binary_layer(N: int, K: int, group_size: int, frac: float, seed: int):
    """The kernel operands of a random binary layer (reference.py, "binary + salient")."""
    g = torch.Generator().manual_seed(seed)
    G = math.ceil(K / group_size)
    signs = fmt.pack(torch.randint(0, 2, (N, K), generator=g).to(torch.uint8), 1)
    alpha = (torch.rand(N, G, generator=g) * 0.05 + 0.001).half().float()
    mu = (torch.randn(N, G, generator=g) * 0.01).half().float()
    mask = torch.rand(N, K, generator=g) < frac
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)]).to(torch.int32)
    col = torch.nonzero(mask)[:, 1].to(torch.int32)
    delta = torch.randn(len(col), generator=g) * 0.05
    return signs, alpha, mu, rowptr, col, delta


@pytest.mark.parametrize(("N", "K", "group_size", "frac"), BINARY_CASES)
def test_host_binary_walk_matches_reference(host_driver: str, N: int, K: int, group_size: int, frac: float) -> None:
    signs, alpha, mu, rowptr, col, delta = random_binary_layer(N, K, group_size, frac, seed=K)
    x = torch.randn(K, generator=torch.Generator().manual_seed(K + 1))
    parts = ["binary", N, K, group_size, len(col), *_u32(signs), *_u32(alpha), *_u32(mu), *rowptr.tolist(),
             *col.tolist(), *_u32(delta), *_u32(x)]
    proc = subprocess.run([host_driver], input=" ".join(map(str, parts)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    tag, *vals = proc.stdout.split()
    assert tag == "y"
    y = _f32([int(v) for v in vals])
    W = reference.binary_dequantize(signs, alpha, mu, group_size, K, rowptr, col, delta)
    y64 = x.double() @ W.double().T
    # the walk sums 4·alpha·(A − X) with A, X of size |x|: a few ulps of alpha·Σ|x| and of the salient terms
    A = alpha.double().repeat_interleave(group_size, dim=1)[:, :K]
    magnitude = (4 * A + W.double().abs()) @ x.double().abs()
    err = (y.double() - y64).abs()
    assert (err <= 16 * torch.finfo(torch.float32).eps * magnitude + 1e-30).all(), f"max error {err.max():.3g}"
    torch.testing.assert_close(y, reference.binary_matmul(x[None], signs, alpha, mu, group_size, rowptr, col,
                                                          delta)[0], rtol=1e-4, atol=1e-5)


# --- 3. load() without a GPU ----------------------------------------------------------------------------

def test_load_returns_none_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: load() may legitimately build")
    build.load.cache_clear()
    ext = build.load()
    assert ext is None
    reason = build.unavailable_reason()
    assert isinstance(reason, str) and reason
    assert build.load() is None and build.load.cache_info().hits >= 1  # cached, not re-probed
    qweight = fmt.pack(torch.zeros(2, 40, dtype=torch.uint8), 4)
    with pytest.raises(RuntimeError, match="CUDA GEMV extension is unavailable"):
        build.wq_gemv(torch.zeros(1, 40), qweight, torch.ones(2, 1), None, 4, 40)


def test_load_swallows_build_failures(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from torch.utils import cpp_extension

    def boom(*args, **kwargs):
        raise RuntimeError("Error building extension 'compress_wq_gemv'")

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(build, "nvcc", lambda: "/nonexistent/cuda/bin/nvcc")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # restored after the test
    monkeypatch.setattr(cpp_extension, "load", boom)
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    build.load.cache_clear()
    try:
        assert build.load() is None
        assert "failed" in build.unavailable_reason() and "Error building extension" in build.unavailable_reason()
        # an exception in the probing itself is swallowed too
        build.load.cache_clear()
        monkeypatch.setattr(build, "nvcc", lambda: 1 / 0)
        assert build.load() is None and "ZeroDivisionError" in build.unavailable_reason()
    finally:
        build.load.cache_clear()


@pytest.mark.slow
def test_the_extension_source_compiles_for_sm80_and_sm90() -> None:
    """wq_gemv.cu itself (binding + launcher), not only the kernels: one nvcc call for both archs against
    this torch's headers (minutes: the torch headers dominate)."""
    if build.nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): CUDA compile check skipped")
    r = build.binding_check(build.ARCHS)
    assert r["ok"], r["log"][-3000:]
    assert " error" not in r["log"]
