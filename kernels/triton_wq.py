"""Triton kernel for the packed low-bit matmul: y [M, N] = x [M, K] @ Ŵᵀ, Ŵ decoded on the fly.

One fused kernel, `_wq_matmul_kernel`, serves every code width b in 1..8, symmetric and asymmetric
grids, fp16/bf16/fp32 scales and every group size g >= 1; its meaning is `reference.wq_matmul`.

Layout walk (compress/format.py). A row n of qweight holds ceil(K/32)·b int32 words: the bit planes of
the codes, widest first. A b-bit code is split into the power-of-two planes present in b's binary
expansion (3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1), so the plane of width p holds bits [s, s+p) of every
code with s = b & -(2p) (the sum of the wider planes), and it starts at word ceil(K/32)·s of the row.
Inside a plane, code k sits in word k // (32/p) at bit offset p·(k % (32/p)), LSB first. A program
owns a tile of BLOCK_N rows and walks K in steps of BLOCK_K, a power of two >= 32: for each plane it
loads the BLOCK_K·p/32 words of its rows that cover the step ([words, BLOCK_N]), shifts every word by
the EPW = 32/p lane offsets ([words, EPW, BLOCK_N]) and reshapes to codes [BLOCK_K, BLOCK_N] (k = word·EPW
+ lane, which is exactly the reshape order). The planes are OR-ed together at their shifts, the group's
(scale, zero) dequantize them, W_hat = scale·(code − zero), in fp32, and `tl.dot` accumulates x·Ŵᵀ in
fp32. K is padded with zero codes to a multiple of 32 in the format; the kernel masks x (and scale)
beyond K, so padded codes contribute nothing, and words beyond a plane's end are never read. Rows may
be `stride_qw` words apart, so the width parts of a mixed layer (column slices of its qweight) need no copy.

Groups. When the group size is a multiple of BLOCK_K (or covers all of K, per-row grids), a K step lies
inside one group and the kernel loads one (scale, zero) per row and step ([BLOCK_N]); BLOCK_K is chosen
as the largest of 128/64/32 (up to the tier's) dividing g to get there. Otherwise (g not a multiple of 32,
e.g. 16 or 48) each element gathers its own group's scale and zero ([BLOCK_K, BLOCK_N],
`TILE_IN_ONE_GROUP=False`), which is correct for any g >= 1 but moves more bytes. A narrower last group
needs nothing special.

Tiles (`choose_config`), three tiers sized with `compile_for` so that no width spills on sm_80 or sm_90:
DECODE (fp16/bf16, M <= 16) 16×32 with BLOCK_K up to 128, 4 warps, 3 stages; PREFILL (fp16/bf16, M > 16)
64×128×32, 8 warps, 4 stages; FP32 (fp32 activations on a GPU, an FMA dot that spills in larger tiles)
16×32×32, 4 warps, 2 stages. Only packed words are staged, so shared memory stays at 6-25 KB. Under the
interpreter fp32 runs with the fp16 tiers: GPU resources do not bind there and fewer programs run faster.

Precision. On a GPU fp16/bf16 activations multiply Ŵ rounded to their dtype on the tensor cores (fp32
accumulation); fp32 activations use an fp32 `tl.dot` with input_precision="ieee" (no TF32). Under
TRITON_INTERPRET=1 (CPU tests) bf16 arithmetic is wrong and fp32→bf16 casts truncate, so bf16 inputs
are computed in fp32 there and the output is written in fp32 and cast by PyTorch (`COMPUTE_FP32`).

Not supported (ValueError from `wq_matmul`): widths outside 1..8, group_size < 1, activation or scale
dtypes other than fp16/bf16/fp32, zero points that are not uint8, shapes that disagree with the
format, inputs not on a CUDA device unless TRITON_INTERPRET=1 was set before this module was imported
(the interpreter runs on CPU tensors). There is no split-K: an M=1 decode runs one BLOCK_M=16 tile
(masked rows) per BLOCK_N rows of W, so small N gives few programs.

`compile_for(arch, bits, ...)` AOT-compiles the kernel for sm_80/sm_90 on a machine with no GPU (the
ptxas bundled with triton) and returns shared memory, registers and spills of the build.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from compress import format as fmt

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options of one kernel specialization."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Tile tiers, chosen by `choose_config`; BLOCK_K is the widest step, narrowed per call to fit the groups.
# Sized with `compile_for` so that no width spills on sm_80/sm_90 (see the module docstring and the tests).
DECODE = Config(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=3)  # fp16/bf16, M <= 16
PREFILL = Config(block_m=64, block_n=128, block_k=32, num_warps=8, num_stages=4)  # fp16/bf16, M > 16
FP32 = Config(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)  # fp32 activations (FMA dot)
CONFIGS = {"decode": DECODE, "prefill": PREFILL, "fp32": FP32}
BLOCK_KS = (128, 64, 32)


@triton.jit
def _plane_codes(qw_rows, k0, KW, n_mask, P: tl.constexpr, SHIFT: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bits [SHIFT, SHIFT+P) of the codes k0..k0+BLOCK_K of rows qw_rows, from the plane of width P.

    qw_rows: [BLOCK_N] pointers to the first word of each row. Returns int32 [BLOCK_K, BLOCK_N].
    """
    EPW: tl.constexpr = 32 // P  # codes per int32 word
    WPT: tl.constexpr = BLOCK_K // EPW  # words of this plane per tile row
    w_idx = k0 // EPW + tl.arange(0, WPT)  # [WPT] word index inside the plane
    w_mask = (w_idx < KW * P)[:, None] & n_mask[None, :]  # [WPT, BLOCK_N]; the plane holds KW·P words
    words = tl.load(qw_rows[None, :] + (KW * SHIFT + w_idx)[:, None], mask=w_mask, other=0)  # [WPT, BLOCK_N]
    lanes = tl.arange(0, EPW) * P  # [EPW] bit offset of each code in its word
    # int32 >> is arithmetic: the mask keeps only this code's P bits, so the sign never leaks
    codes = (words[:, None, :] >> lanes[None, :, None]) & ((1 << P) - 1)  # [WPT, EPW, BLOCK_N]
    return tl.reshape(codes, (BLOCK_K, BLOCK_N)) << SHIFT  # k = word·EPW + lane


@triton.jit
def _wq_matmul_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32, contiguous
    qw_ptr,  # int32 [N, KW·BITS], rows stride_qw words apart (a column slice of a mixed layer); KW = ceil(K/32)
    scale_ptr,  # [N, G] fp16/bf16/fp32; G = ceil(K/GROUP_SIZE)
    zero_ptr,  # uint8 [N, G] (unused when SYMMETRIC); mu [N, G] in scale's dtype when BINARY
    y_ptr,  # [M, N]
    M, N, K, stride_qw,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BINARY: tl.constexpr,  # a binary layer (BITS = 1): Ŵ = mu + alpha·(2·sign − 1)
    TILE_IN_ONE_GROUP: tl.constexpr,  # every K step lies inside one group
    COMPUTE_FP32: tl.constexpr,  # dot in fp32 (fp32 inputs, or bf16 under the interpreter)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_mask = offs_m < M
    n_mask = offs_n < N
    KW = tl.cdiv(K, 32)  # words per plane and row
    G = tl.cdiv(K, GROUP_SIZE)  # groups per row

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K  # [BLOCK_M, 1]
    qw_rows = qw_ptr + offs_n.to(tl.int64) * stride_qw  # [BLOCK_N] first word of each row
    sz_rows = offs_n.to(tl.int64) * G  # [BLOCK_N] offset of each row's groups in scale and zero

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]

        # codes [BLOCK_K, BLOCK_N]: the planes of BITS, widest first; plane p holds bits from BITS & -(2p)
        q = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
        if BITS & 8:
            q |= _plane_codes(qw_rows, k0, KW, n_mask, 8, BITS & -16, BLOCK_K, BLOCK_N)
        if BITS & 4:
            q |= _plane_codes(qw_rows, k0, KW, n_mask, 4, BITS & -8, BLOCK_K, BLOCK_N)
        if BITS & 2:
            q |= _plane_codes(qw_rows, k0, KW, n_mask, 2, BITS & -4, BLOCK_K, BLOCK_N)
        if BITS & 1:
            q |= _plane_codes(qw_rows, k0, KW, n_mask, 1, BITS & -2, BLOCK_K, BLOCK_N)

        # the group's scale and zero: [1, BLOCK_N] for a step inside one group, else gathered [BLOCK_K, BLOCK_N]
        if TILE_IN_ONE_GROUP:
            sz_off = (k0 // GROUP_SIZE + sz_rows)[None, :]
            sz_mask = n_mask[None, :]
        else:
            sz_off = (offs_k // GROUP_SIZE)[:, None] + sz_rows[None, :]
            sz_mask = k_mask[:, None] & n_mask[None, :]
        s = tl.load(scale_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
        if BINARY:  # Ŵ = mu + alpha·(2·sign − 1): scale holds alpha, zero_ptr mu
            mu = tl.load(zero_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
            w = mu + s * (2 * q - 1).to(tl.float32)
        else:
            if SYMMETRIC:
                q -= 1 << (BITS - 1)
            else:
                q -= tl.load(zero_ptr + sz_off, mask=sz_mask, other=0).to(tl.int32)
            w = q.to(tl.float32) * s  # [BLOCK_K, BLOCK_N] = Ŵᵀ tile, exact in fp32

        if COMPUTE_FP32:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]  # [BLOCK_M, BLOCK_N]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _csr_correction_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32, contiguous
    rowptr_ptr,  # int32 [N + 1]
    col_ptr,  # int32 [nnz]
    delta_ptr,  # fp32 [nnz]
    y_ptr,  # fp32 [M, N], updated in place
    M, N, K,
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """y[m, n] += sum over the salient entries j of row n of x[m, col_j]·delta_j (one program per row n
    and BLOCK_M activation rows; the entries are walked BLOCK_J at a time, x gathered at their columns)."""
    pid_m = tl.program_id(0)
    n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    m_mask = offs_m < M
    start = tl.load(rowptr_ptr + n)
    end = tl.load(rowptr_ptr + n + 1)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)  # [BLOCK_J]
        j_mask = offs_j < end
        c = tl.load(col_ptr + offs_j, mask=j_mask, other=0)
        d = tl.load(delta_ptr + offs_j, mask=j_mask, other=0.0)
        xv = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * K + c[None, :], mask=m_mask[:, None] & j_mask[None, :],
                     other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_J]
        acc += tl.sum(xv * d[None, :], axis=1)
    y_ptrs = y_ptr + offs_m.to(tl.int64) * N + n
    tl.store(y_ptrs, tl.load(y_ptrs, mask=m_mask, other=0.0) + acc, mask=m_mask)


CORRECTION_BLOCK_M, CORRECTION_BLOCK_J = 16, 64

INTERPRETED = not isinstance(_wq_matmul_kernel, triton.runtime.JITFunction)


def available() -> bool:
    """True when the kernel can run: a CUDA device, or TRITON_INTERPRET=1 set before this import."""
    return INTERPRETED or torch.cuda.is_available()


def choose_config(M: int, K: int, group_size: int, fp32_dot: bool) -> tuple[Config, bool]:
    """(tile config, TILE_IN_ONE_GROUP) of a call: the tier (fp32 dot, or fp16/bf16 by M), with BLOCK_K the
    widest step <= the tier's that divides the group size, so every K step lies inside one group (any step
    does when one group covers K). Group sizes that no step divides keep the tier's BLOCK_K and gather."""
    tier = FP32 if fp32_dot else DECODE if M <= 16 else PREFILL
    if group_size >= K:
        return tier, True
    block_k = next((bk for bk in BLOCK_KS if bk <= tier.block_k and group_size % bk == 0), None)
    if block_k is None:
        return tier, False
    return replace(tier, block_k=block_k), True


def _check(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int) -> None:
    if bits not in fmt.PLANES:
        raise ValueError(f"bits={bits} is not a packed width; the Triton kernel supports 1..8")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1 (pass K for a per-row grid)")
    if x.dtype not in DTYPES or scale.dtype not in DTYPES:
        raise ValueError(f"activations {x.dtype} / scales {scale.dtype}: the Triton kernel takes fp16, bf16 or fp32")
    if zero is not None and zero.dtype != torch.uint8:
        raise ValueError(f"zero points must be uint8, got {zero.dtype}")
    K = x.shape[-1]
    N = qweight.shape[0]
    G = math.ceil(K / group_size)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (N, fmt.packed_words(K, bits)):
        raise ValueError(f"qweight must be int32 [N, {fmt.packed_words(K, bits)}] for K={K}, bits={bits}; "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    if tuple(scale.shape) != (N, G) or (zero is not None and tuple(zero.shape) != (N, G)):
        raise ValueError(f"scale/zero must be [{N}, {G}] for K={K}, group_size={group_size}; got "
                         f"{tuple(scale.shape)} / {None if zero is None else tuple(zero.shape)}")
    devices = {t.device for t in (x, qweight, scale, zero) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not INTERPRETED and x.device.type != "cuda":
        raise ValueError(f"the input is on {x.device}: the Triton kernel needs a CUDA device, or TRITON_INTERPRET=1 "
                         "set before compress.kernels.triton_wq is imported")


def wq_matmul(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int,
              *, config: Config | None = None) -> Tensor:
    """y [..., N] = x [..., K] @ Ŵᵀ with Ŵ = scale·(code − zero) decoded in the kernel; returned in x's dtype.

    Same contract as `reference.wq_matmul`: qweight int32 [N, ceil(K/32)·bits], scale [N, ceil(K/group_size)],
    zero uint8 [N, G] or None (symmetric, zero = 2**(bits-1)); group_size = K for per-row grids. `config`
    forces a tile config (benchmarks, tests; block_k a power of two >= 32); by default `choose_config` picks.
    """
    _check(x, qweight, scale, zero, bits, group_size)
    return _launch(x, qweight, scale, zero, bits, group_size, config, binary=False)


def binary_matmul(x: Tensor, signs: Tensor, alpha: Tensor, mu: Tensor, group_size: int, rowptr: Tensor,
                  col: Tensor, delta: Tensor, *, config: Config | None = None) -> Tensor:
    """y [..., N] = x [..., K] @ Ŵᵀ for a binary layer, Ŵ = mu + alpha·(2·sign − 1) plus the salient CSR
    correction (`reference.binary_matmul`): the 1-bit pass of the fused kernel, then one program per output
    row adds x[:, col]·delta over its salient entries, both accumulating into one fp32 output."""
    _check(x, signs, alpha, None, 1, group_size)
    if mu.dtype != alpha.dtype or mu.shape != alpha.shape:
        raise ValueError(f"mu must match alpha ({alpha.dtype} {tuple(alpha.shape)}), got {mu.dtype} {tuple(mu.shape)}")
    N, K = signs.shape[0], x.shape[-1]
    if rowptr.dtype != torch.int32 or rowptr.shape != (N + 1,) or col.dtype != torch.int32 or \
            delta.dtype != torch.float32 or col.shape != delta.shape:
        raise ValueError(f"the salient correction must be rowptr int32 [{N + 1}], col int32 [nnz] and delta fp32 "
                         f"[nnz]; got {rowptr.dtype} {tuple(rowptr.shape)}, {col.dtype} {tuple(col.shape)}, "
                         f"{delta.dtype} {tuple(delta.shape)}")
    if col.numel() == 0:
        return _launch(x, signs, alpha, mu, 1, group_size, config, binary=True)
    y = _launch(x, signs, alpha, mu, 1, group_size, config, binary=True, out_dtype=torch.float32)
    x2, y2 = x.reshape(-1, K).contiguous(), y.reshape(-1, N)
    M = x2.shape[0]
    if M and N:
        grid = (triton.cdiv(M, CORRECTION_BLOCK_M), N)
        _csr_correction_kernel[grid](x2, rowptr.contiguous(), col.contiguous(), delta.contiguous(), y2, M, N, K,
                                     BLOCK_M=CORRECTION_BLOCK_M, BLOCK_J=CORRECTION_BLOCK_J)
    return y.to(x.dtype)


def _launch(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int,
            config: Config | None, *, binary: bool, out_dtype: torch.dtype | None = None) -> Tensor:
    """Run `_wq_matmul_kernel` on checked inputs; y in `out_dtype` (default x's dtype), shaped [..., N]."""
    K, N = x.shape[-1], qweight.shape[0]
    x2 = x.reshape(-1, K).contiguous()  # [M, K]
    M = x2.shape[0]
    compute_fp32 = x.dtype == torch.float32 or (INTERPRETED and x.dtype == torch.bfloat16)
    # the interpreter truncates fp32 -> bf16 casts: write fp32 there and round with PyTorch
    final = out_dtype or x.dtype
    kernel_dtype = torch.float32 if INTERPRETED and final == torch.bfloat16 else final
    y = torch.empty(M, N, dtype=kernel_dtype, device=x.device)
    if M == 0 or N == 0 or K == 0:
        return y.zero_().to(final).reshape(*x.shape[:-1], N)
    if config is None:
        # GPU resources do not bind the interpreter, and its cost grows with the number of programs: it runs
        # fp32 with the fp16 tiers (the tile shapes of the FP32 tier occur there too, e.g. DECODE with g = 32)
        cfg, one_group = choose_config(M, K, group_size, fp32_dot=compute_fp32 and not INTERPRETED)
    else:
        if config.block_k < 32 or config.block_k & (config.block_k - 1):
            raise ValueError(f"block_k={config.block_k} must be a power of two >= 32 (whole words of every plane)")
        cfg, one_group = config, group_size >= K or group_size % config.block_k == 0
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n))
    qw = qweight if qweight.stride(1) == 1 else qweight.contiguous()  # width parts are column slices: no copy
    _wq_matmul_kernel[grid](
        x2, qw, scale.contiguous(), scale if zero is None else zero.contiguous(), y,
        M, N, K, qw.stride(0),
        BITS=bits, GROUP_SIZE=group_size, SYMMETRIC=zero is None, BINARY=binary, TILE_IN_ONE_GROUP=one_group,
        COMPUTE_FP32=compute_fp32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.to(final).reshape(*x.shape[:-1], N)


# --- AOT compile check (no GPU needed) -----------------------------------------------------------------

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class BuildInfo:
    """Resources of one compiled specialization, as ptxas built it."""

    arch: int
    bits: int
    config: Config
    shared: int  # bytes of shared memory per program (Triton's dynamic allocation)
    n_regs: int  # registers per thread
    n_spills: int  # local memory words (4 bytes) per thread, as Triton's driver reports it: 0 = no spills
    n_mma: int  # tensor-core mma instructions in the PTX (mma.sync on sm_80, wgmma or mma.sync on sm_90)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spills) per thread of the cubin's kernel, from the cuobjdump bundled with triton.

    Spilled registers live in the stack frame (cuobjdump's LOCAL column stays 0 for them); a Triton kernel
    has no local arrays, so the stack frame is the spill space. Like Triton's driver on a GPU (the local
    memory size / 4), spills are counted in 4-byte words.
    """
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path], check=True,
                             capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot read registers and stack from cuobjdump --dump-resource-usage:\n{out}")
    return int(m.group(1)), int(m.group(2)) // 4


def compile_for(arch: int, bits: int, config: Config = DECODE, *, x_dtype: torch.dtype = torch.float16,
                scale_dtype: torch.dtype = torch.float16, symmetric: bool = False, group_size: int = 128,
                tile_in_one_group: bool = True, binary: bool = False) -> BuildInfo:
    """Compile the kernel for sm_`arch` (80, 90, ...) with triton's bundled ptxas; no GPU needed.
    `binary` builds the binary-layer specialization (bits must be 1; mu in scale's dtype).

    Needs the JIT kernel: call it in a process where TRITON_INTERPRET is not set.
    """
    if binary and bits != 1:
        raise ValueError("a binary layer has 1-bit codes")
    xt, st = _TRITON_DTYPES[x_dtype], _TRITON_DTYPES[scale_dtype]
    constexprs = {"BITS": bits, "GROUP_SIZE": group_size, "SYMMETRIC": symmetric, "BINARY": binary,
                  "TILE_IN_ONE_GROUP": tile_in_one_group, "COMPUTE_FP32": x_dtype == torch.float32,
                  "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k}
    signature = {"x_ptr": f"*{xt}", "qw_ptr": "*i32", "scale_ptr": f"*{st}", "zero_ptr": f"*{st}" if binary else "*u8",
                 "y_ptr": f"*{xt}", "M": "i32", "N": "i32", "K": "i32", "stride_qw": "i32",
                 **dict.fromkeys(constexprs, "constexpr")}
    return _build(_wq_matmul_kernel, signature, constexprs, arch, bits, config)


def compile_correction_for(arch: int, *, x_dtype: torch.dtype = torch.float16) -> BuildInfo:
    """Compile the salient CSR correction kernel of `binary_matmul` for sm_`arch` (see `compile_for`)."""
    constexprs = {"BLOCK_M": CORRECTION_BLOCK_M, "BLOCK_J": CORRECTION_BLOCK_J}
    signature = {"x_ptr": f"*{_TRITON_DTYPES[x_dtype]}", "rowptr_ptr": "*i32", "col_ptr": "*i32", "delta_ptr": "*fp32",
                 "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", **dict.fromkeys(constexprs, "constexpr")}
    config = Config(block_m=CORRECTION_BLOCK_M, block_n=1, block_k=CORRECTION_BLOCK_J, num_warps=4, num_stages=1)
    return _build(_csr_correction_kernel, signature, constexprs, arch, 1, config)


def _build(fn: object, signature: dict[str, str], constexprs: dict[str, object], arch: int, bits: int,
           config: Config) -> BuildInfo:
    if INTERPRETED:
        raise RuntimeError("compiling needs the JIT kernels: import this module without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    n_regs, n_spills = _resource_usage(kernel.asm["cubin"])
    n_mma = len(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)\b", kernel.asm["ptx"]))
    return BuildInfo(arch, bits, config, kernel.metadata.shared, n_regs, n_spills, n_mma)


__all__ = ["CONFIGS", "DECODE", "FP32", "PREFILL", "BuildInfo", "Config", "available", "binary_matmul", "choose_config",
           "compile_correction_for", "compile_for", "wq_matmul"]
