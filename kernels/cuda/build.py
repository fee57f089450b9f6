"""Build, load and compile-check the CUDA batch-1 GEMV for packed 2/3/4-bit group-wise layers.

`load()` JIT-builds the torch extension `wq_gemv.cu` once per process (cached on disk by a hash of the
sources and the torch/CUDA versions) and returns the module, or None, with the reason logged and kept
in `unavailable_reason()`, when there is no CUDA device, no CUDA build of torch, no nvcc or ninja, or
the build fails. It never raises. `wq_gemv(...)` is the op behind kernels.BACKENDS["cuda"]: the contract
of `kernels/reference.py::wq_matmul` for x with one row.

`nvcc_check(arch)` compiles the kernels alone (`wq_gemv_kernels.cuh`, which includes no torch header)
to a cubin for sm_<arch> with `ptxas -v` and returns the per-kernel registers, spills, stack and shared
memory. It needs only nvcc, so CPU machines and CI can check that every kernel the extension launches
compiles for Ampere and Hopper without spilling (tests/kernels/test_cuda.py).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from compress.kernels import jit

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
EXTENSION = HERE / "wq_gemv.cu"
KERNELS = HERE / "wq_gemv_kernels.cuh"
SOURCES = (EXTENSION, KERNELS, HERE / "unpack.cuh")
ARCHS = (80, 90)  # sm_80 (A100, the 30/40 series run it too) and sm_90 (H100)
CACHE_ENV = "COMPRESS_CUDA_CACHE"  # where JIT builds go; default ~/.cache/compress/cuda

_reason: str | None = None


def nvcc() -> str | None:
    """Path of nvcc: $CUDA_HOME/bin/nvcc, then PATH, then /usr/local/cuda/bin/nvcc; None if none exists."""
    candidates = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        candidates.append(Path(found))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def _toolkit_root(nvcc_path: str) -> Path:
    """The CUDA toolkit of an nvcc, through symlinks and one-line wrapper scripts (/usr/local/bin/nvcc
    is often `exec /usr/local/cuda-X/bin/nvcc "$@"`, which makes torch guess CUDA_HOME = /usr/local)."""
    real = Path(nvcc_path).resolve()
    if (real.parent.parent / "include" / "cuda_runtime.h").is_file():
        return real.parent.parent
    try:
        text = real.read_text(errors="ignore")[:4096]
    except OSError:
        text = ""
    m = re.search(r"exec\s+(\S+/bin/nvcc)\b", text)
    return Path(m.group(1)).resolve().parent.parent if m else real.parent.parent


def _build() -> tuple[ModuleType | None, str | None]:
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return None, "torch.cuda.is_available() is False (no GPU or no driver)"
    nvcc_path = nvcc()
    if nvcc_path is None:
        return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed (pip install ninja): torch.utils.cpp_extension needs it"
    root = _toolkit_root(nvcc_path)
    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "include" / "cuda_runtime.h").is_file():
        log.info("torch.utils.cpp_extension.CUDA_HOME=%s has no include/cuda_runtime.h; using %s", home, root)
        cpp_extension.CUDA_HOME = str(root)
    tag = jit.tag(list(SOURCES))
    build_dir = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "compress" / "cuda") / f"wq_gemv-{tag}"
    return jit.build(f"compress_wq_gemv_{tag}", EXTENSION, build_dir, "CUDA GEMV extension",
                     extra_include_paths=[str(HERE)], extra_cflags=["-O3"], extra_cuda_cflags=["-O3"])


@functools.cache
def load() -> ModuleType | None:
    """The built extension, or None (reason logged, see `unavailable_reason`). Cached; never raises."""
    global _reason
    try:
        ext, _reason = _build()
    except Exception as e:  # belt and braces: nothing in the probing above may escape either
        ext, _reason = None, f"unexpected {type(e).__name__}: {e}"
    if ext is None:
        log.info("CUDA GEMV unavailable: %s", _reason)
    return ext


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None if it has not been called or succeeded)."""
    return _reason


def wq_gemv(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int) -> Tensor:
    """y [1, N] = x [1, K] @ W_hatᵀ on a CUDA device, fp32 accumulation, in x's dtype (reference.wq_matmul
    with M = 1; bits 2, 3 or 4; zero None = symmetric)."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"the CUDA GEMV extension is unavailable: {unavailable_reason()}")
    if zero is None:
        zero = torch.empty(0, dtype=torch.uint8, device=x.device)
    return ext.wq_gemv(x, qweight, scale, zero, int(bits), int(group_size))


def binary_gemv(x: Tensor, signs: Tensor, alpha: Tensor, mu: Tensor, group_size: int, rowptr: Tensor, col: Tensor,
                delta: Tensor) -> Tensor:
    """y [1, N] = x [1, K] @ W_hatᵀ of a binary layer with its salient CSR correction on a CUDA device
    (reference.binary_matmul with M = 1)."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"the CUDA GEMV extension is unavailable: {unavailable_reason()}")
    return ext.binary_gemv(x, signs, alpha, mu, int(group_size), rowptr, col, delta)


# --- compile check ----------------------------------------------------------------------------------------

_XTYPES = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}


def _kernel_name(mangled: str) -> str:
    """`gemv_kernel<fp16, 3>` for _ZN2wq11gemv_kernelI6__halfLi3ELb0EE..., `gemv_kernel<fp16, binary>` for the
    binary specialization (Li1ELb1E), else the mangled name."""
    m = re.match(r"_ZN2wq11gemv_kernelI(13__nv_bfloat16|6__half|f)Li(\d+)E(?:Lb([01])E)?", mangled)
    if m is None:
        return mangled
    return f"gemv_kernel<{_XTYPES[m.group(1)]}, {'binary' if m.group(3) == '1' else m.group(2)}>"


def parse_ptxas(log_text: str) -> dict[str, dict[str, int]]:
    """Per entry function of a `ptxas -v` log: registers, spill_stores, spill_loads, stack, smem, barriers."""
    entries: dict[str, dict[str, int]] = {}
    props: dict[str, dict[str, int]] = {}
    current = None  # the function the next "Used ..." / properties line belongs to
    for line in log_text.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            current = m.group(1)
            entries[current] = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0,
                                "barriers": 0}
        elif m := re.search(r"Function properties for (\S+)", line):
            current = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            if current is not None:
                props[current] = {"stack": int(m.group(1)), "spill_stores": int(m.group(2)),
                                  "spill_loads": int(m.group(3))}
        elif (m := re.search(r"Used (\d+) registers", line)) and current in entries:
            e = entries[current]
            e["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                e["smem"] = int(s.group(1))
            if b := re.search(r"used (\d+) barriers", line):
                e["barriers"] = int(b.group(1))
    for name, e in entries.items():
        e.update(props.get(name, {}))
    return {_kernel_name(k): v for k, v in entries.items()}


def nvcc_check(arch: int, *, timeout: float = 600.0) -> dict[str, Any]:
    """Compile every kernel of the extension for sm_<arch> (`nvcc -cubin -Xptxas -v`) and report.

    Returns {"arch", "ok", "returncode", "seconds", "command", "kernels": {name: {registers,
    spill_stores, spill_loads, stack, smem, barriers}}, "max_registers", "spill_stores", "spill_loads",
    "stack", "smem", "log"} (the totals are maxima / sums over kernels). Raises FileNotFoundError when
    there is no nvcc. One nvcc call, about 10 s per architecture on 2 idle cores. -std=c++20 as torch's
    own extension build uses (the headers are C++17 too: the host test builds them with g++ -std=c++17).
    """
    nvcc_path = nvcc()
    if nvcc_path is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    with tempfile.TemporaryDirectory(prefix="wq_gemv_check_") as tmp:
        cmd = [nvcc_path, "-x", "cu", "-std=c++20", "-O3", "-DWQ_GEMV_COMPILE_CHECK", f"-arch=sm_{arch}", "-cubin",
               "-Xptxas", "-v", "-o", str(Path(tmp) / f"wq_gemv_sm{arch}.cubin"), str(KERNELS)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        seconds = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    kernels = parse_ptxas(text)
    vals = list(kernels.values())
    return {
        "arch": arch,
        "ok": proc.returncode == 0,
        "returncode": proc.returncode,
        "seconds": round(seconds, 2),
        "command": " ".join(cmd),
        "kernels": kernels,
        "max_registers": max((k["registers"] for k in vals), default=0),
        "spill_stores": sum(k["spill_stores"] for k in vals),
        "spill_loads": sum(k["spill_loads"] for k in vals),
        "stack": max((k["stack"] for k in vals), default=0),
        "smem": max((k["smem"] for k in vals), default=0),
        "log": text,
    }


def binding_check(archs: tuple[int, ...] = (80, 90), *, timeout: float = 1200.0) -> dict[str, Any]:
    """Compile the extension's own source (wq_gemv.cu: pybind binding + launcher + kernels) to an object for
    every arch in one nvcc call, against this torch's headers. A CPU wheel of torch lacks the one generated
    header c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in (in a temporary include dir) is enough to
    compile. Minutes: the torch headers dominate. Returns {"ok", "returncode", "seconds", "command", "log"}."""
    import sysconfig

    from torch.utils import cpp_extension

    nvcc_path = nvcc()
    if nvcc_path is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    with tempfile.TemporaryDirectory(prefix="wq_gemv_binding_") as tmp:
        stub = Path(tmp) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n")
        includes = [tmp, str(HERE), *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
        gencode = [a for arch in archs for a in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
        cmd = [nvcc_path, "-x", "cu", "-std=c++20", "-O3", "-c", *gencode, *[f"-I{i}" for i in includes],
               "-DTORCH_EXTENSION_NAME=compress_wq_gemv_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-Xcompiler", "-fPIC",
               "-o", str(Path(tmp) / "wq_gemv.o"),
               str(EXTENSION)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "command": " ".join(cmd), "log": proc.stdout + proc.stderr}


__all__ = ["ARCHS", "binary_gemv", "binding_check", "load", "nvcc", "nvcc_check", "parse_ptxas", "unavailable_reason",
           "wq_gemv"]
