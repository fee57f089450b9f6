"""Build and load the CPU GEMV for packed 2/3/4-bit group-wise layers (`cpu_gemv.cpp`).

`load()` JIT-builds the torch C++ extension with `torch.utils.cpp_extension.load` the first time it is
called (never at import): **the first call compiles, which takes a while** (about a minute on 2 busy cores:
torch's headers and the unrolled kernel variants); later calls, and later processes, reuse the build cached
under `~/.cache/compress/cpu` (or `$COMPRESS_CPU_CACHE`) in a directory keyed by a hash of the source, the
compiler flags and the torch version. It returns the module, or None with the reason logged and kept in
`unavailable_reason()` when there is no C++ compiler or ninja, or the build fails; it never raises.

The build passes `-O3 -mavx2 -mfma -mf16c` when this CPU has AVX2, FMA and F16C (/proc/cpuinfo, else
torch's CPU capability), which enables the vectorised path; otherwise the extension is built with its
portable scalar loops. `-fopenmp` lets `at::parallel_for` split rows over torch's intra-op threads (the
extension links the libgomp torch already loaded).

`wq_gemv(x, qweight, scale, zero, bits, group_size, bias=None)` is the op behind `cpu.linear` for a few
rows of x: the contract of `kernels/reference.py::wq_matmul` (fp32 accumulation, result in x's dtype) for x
fp32 or bf16 [..., K], bits 1 to 4, any group size, scales fp16/bf16/fp32, zero uint8 or None (symmetric)
or fp32 (the affine form of a binary layer, kernels/cpu.py), plus an optional bias added in fp32 before the
result is rounded to x's dtype. `csr_add_(y, x, rowptr, col, delta)` adds a binary layer's salient CSR
correction to a GEMV's fp32 result in place.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sysconfig
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from compress.kernels import jit

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "cpu_gemv.cpp"
CACHE_ENV = "COMPRESS_CPU_CACHE"  # where JIT builds go; default ~/.cache/compress/cpu
BITS = (1, 2, 3, 4, 5, 6, 7, 8)  # widths 1-4 take the AVX2 path, 5-8 the portable one

_reason: str | None = None
_ext: ModuleType | None = None  # set by a successful load(): the per-call path skips the cache lookup
_NO_ZERO = torch.empty(0, dtype=torch.uint8)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_avx2() -> bool:
    """Whether this CPU runs AVX2, FMA and F16C (the vectorised path of the extension)."""
    flags = _cpu_flags()
    if flags:
        return {"avx2", "fma", "f16c"} <= flags
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except Exception:  # older torch without get_cpu_capability
        return False


def cflags() -> list[str]:
    return ["-O3", "-fopenmp", *(["-mavx2", "-mfma", "-mf16c"] if has_avx2() else [])]


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    return shutil.which(cxx.split()[0]) or shutil.which("c++") or shutil.which("g++")


def _build() -> tuple[ModuleType | None, str | None]:
    from torch.utils import cpp_extension

    if _compiler() is None:
        return None, "no C++ compiler found (install g++ or set CXX)"
    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed (pip install ninja): torch.utils.cpp_extension needs it"
    flags = cflags()
    tag = jit.tag([SOURCE], *flags)
    build_dir = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "compress" / "cpu") / f"cpu_gemv-{tag}"
    return jit.build(f"compress_cpu_gemv_{tag}", SOURCE, build_dir, "CPU GEMV extension", extra_cflags=flags,
                     extra_ldflags=["-fopenmp"])


@functools.cache
def load() -> ModuleType | None:
    """The built extension, or None (reason logged, see `unavailable_reason`). Cached; never raises."""
    global _reason, _ext
    try:
        ext, _reason = _build()
    except Exception as e:  # nothing in the probing above may escape either
        ext, _reason = None, f"unexpected {type(e).__name__}: {e}"
    if ext is None:
        log.warning("CPU GEMV unavailable, packed layers keep the int4 (tinygemm) path: %s", _reason)
    _ext = ext
    return ext


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None if it has not been called or succeeded)."""
    return _reason


def _require() -> ModuleType:
    ext = _ext or load()
    if ext is None:
        raise RuntimeError(f"the CPU GEMV extension is unavailable: {unavailable_reason()}")
    return ext


def wq_gemv(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int,
            bias: Tensor | None = None) -> Tensor:
    """y [..., N] = x [..., K] @ W_hatᵀ (+ bias) on the CPU, fp32 accumulation, in x's dtype
    (reference.wq_matmul for x fp32/bf16, bits 1-8, zero None = symmetric). Meant for few rows of x: every
    4 rows decode W again."""
    return _require().wq_gemv(x, qweight, scale, _NO_ZERO if zero is None else zero, bits, group_size, bias)



def wq_dequant(qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int, K: int,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Ŵ [N, K] in `dtype`: the reference decode s·(code − z) in fp32, bit for bit, rounded once to `dtype`."""
    return _require().wq_dequant(qweight, scale, _NO_ZERO if zero is None else zero, bits, group_size, K, dtype)


def csr_add_(y: Tensor, x: Tensor, rowptr: Tensor, col: Tensor, delta: Tensor) -> Tensor:
    """y [M, N] += x [M, K] @ Dᵀ in place, fp32, for the CSR matrix D (rowptr int32 [N + 1], col int32 or int16
    read as uint16 [nnz], delta fp32 [nnz]): a binary layer's salient correction. Returns y."""
    _require().csr_add_(y, x, rowptr, col, delta)
    return y


__all__ = ["BITS", "CACHE_ENV", "cflags", "csr_add_", "has_avx2", "load", "unavailable_reason", "wq_dequant",
           "wq_gemv"]
