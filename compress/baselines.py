"""Reference points that need no calibration: the original loaded through bitsandbytes (NF4 / FP4 /
LLM.int8()), next to our checkpoints in `compress eval` (`--bnb nf4|fp4|int8`).

`bnb(model, kind)` swaps the same Linears our pipeline compresses (every nn.Linear inside the
transformer blocks; embeddings, norms and lm_head stay dense, as in bitsandbytes' transformers
integration) for `bnb.nn.Linear4bit` / `bnb.nn.Linear8bitLt`, quantizing on the model's device.
`bnb_bits` / `bits` count bits per weight the way `evaluate.bits` does for our checkpoints:
(code bits, code + scale bits), weighted by element count.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from compress import models
from compress.errors import CompressError
from compress.nn import set_module

log = logging.getLogger(__name__)

KINDS = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # 4-bit: one absmax per 64 consecutive weights (row-major), transformers' default
THRESHOLD = 6.0  # LLM.int8(): activation columns above this run in 16-bit (transformers' default)
# 0.45 brought today's int8 layout (row-major CB + per-row SCB); CPU kernels came in 0.46 (NF4, int8) and
# 0.47 (FP4); older or device-less builds are caught by `_probe`. 0.49-0.50's CPU 4-bit kernels decode a row
# whose length is not a multiple of the block size with the wrong block scales (and 0.50's matmul fails on it),
# which `_check_ragged` catches; the extras pin 0.47-0.48, tested with 0.48.2.
MIN_VERSION = (0, 45)
INSTALL = "pip install 'bitsandbytes>=0.47,<0.49'"


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise CompressError(f"unknown bitsandbytes kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def settings(kind: str, double_quant: bool = False) -> dict[str, Any]:
    """What `bnb` does for `kind` (for fingerprints and reports)."""
    check_kind(kind)
    if kind == "int8":
        return {"kind": kind, "threshold": THRESHOLD, "has_fp16_weights": False}
    return {"kind": kind, "blocksize": BLOCKSIZE, "double_quant": double_quant}


def _import() -> Any:
    """bitsandbytes, or a one-line CompressError saying how to get a usable one."""
    try:
        import bitsandbytes
    except Exception as e:  # ImportError, or a broken native library (RuntimeError, OSError)
        why = "is not installed" if isinstance(e, ImportError) else f"does not import ({str(e).splitlines()[0][:120]})"
        raise CompressError(f"bitsandbytes {why}; {INSTALL}") from e
    found = tuple(int(p) for p in bitsandbytes.__version__.split(".")[:2] if p.isdigit())
    if found < MIN_VERSION:
        raise CompressError(f"bitsandbytes {bitsandbytes.__version__} is too old; {INSTALL}")
    return bitsandbytes


def version() -> str:
    return _import().__version__


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears `bnb` replaces: every nn.Linear inside the transformer blocks (what `make_plan` picks)."""
    arch = models.arch_of(model)
    return {f"{arch.blocks}.{name}": m for name, m in models.blocks_of(model, arch).named_modules()
            if isinstance(m, nn.Linear)}


class _DropCastWarning(logging.Filter):
    """bitsandbytes warns on every int8 matmul of a non-fp16 input; `bnb` says it once at info level instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_warning() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastWarning) for f in logger.filters):
        logger.addFilter(_DropCastWarning())


def _convert(b: Any, lin: nn.Linear, kind: str, device: torch.device, double_quant: bool) -> nn.Module:
    """One quantized copy of `lin` on `device` (quantization happens in the parameter's `.to(device)`)."""
    dtype = lin.weight.dtype
    has_bias = lin.bias is not None
    if kind == "int8":
        new = b.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=THRESHOLD, device="meta")
        # Int8Params quantizes only when it moves off the CPU (as in transformers' loader): start there
        new.weight = b.nn.Int8Params(lin.weight.data.detach().cpu(), requires_grad=False,
                                     has_fp16_weights=False).to(device)
    else:
        new = b.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=dtype,
                              compress_statistics=double_quant, quant_type=kind, device="meta")
        new.weight = b.nn.Params4bit(lin.weight.data.detach(), requires_grad=False, blocksize=BLOCKSIZE,
                                     compress_statistics=double_quant, quant_type=kind, module=new).to(device)
    if has_bias:
        new.bias = nn.Parameter(lin.bias.data.detach().to(device), requires_grad=False)
    return new.train(lin.training)


def _check_ragged(b: Any, kind: str, K: int, device: torch.device, dtype: torch.dtype, double_quant: bool) -> None:
    """4-bit blocks run over the flattened weight, so with K % 64 != 0 they straddle rows. Quantize a [4, K]
    Linear whose consecutive blocks differ in scale by 4x and read Ŵ back through its forward: every entry must
    sit within half of the widest code gap (1/3 of its block's absmax for FP4) of W, which a decode with
    another block's scale cannot."""
    N = 4
    scale = 4.0 ** (torch.arange(N * K) // BLOCKSIZE % 3)  # per flattened block: 1, 4, 16, 1, ...
    W = torch.linspace(-1, 1, BLOCKSIZE).repeat(N * K // BLOCKSIZE + 1)[: N * K] * scale
    lin = nn.Linear(K, N, bias=False, device=device, dtype=dtype).eval()
    with torch.no_grad():
        lin.weight.copy_(W.view(N, K))
        try:
            W_hat = _convert(b, lin, kind, device, double_quant)(torch.eye(K, device=device, dtype=dtype)).T.float()
            bad = float(((W_hat.cpu().flatten() - W).abs() / scale).max()) > 0.34
        except Exception:
            bad = True
    if bad:
        raise CompressError(f"bitsandbytes {b.__version__} runs {kind} wrongly on {device.type} for Linears whose "
                            f"in_features is not a multiple of {BLOCKSIZE} (this model has {K}); {INSTALL}")


def _probe(b: Any, kind: str, device: torch.device, dtype: torch.dtype, double_quant: bool) -> None:
    """Quantize and run one small Linear on `device`: a backend that cannot is a one-line error."""
    try:
        lin = nn.Linear(BLOCKSIZE, BLOCKSIZE, device=device, dtype=dtype).eval()
        with torch.no_grad():
            _convert(b, lin, kind, device, double_quant)(torch.ones(2, BLOCKSIZE, device=device, dtype=dtype))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        fix = f"use --device cpu, or {INSTALL} built for {device.type}" if device.type != "cpu" else INSTALL
        raise CompressError(f"bitsandbytes {b.__version__} cannot run {kind} on {device.type} ({first}); {fix}") from e


def bnb(model: nn.Module, kind: str, *, double_quant: bool = False) -> nn.Module:
    """Replace every Linear inside the blocks by its bitsandbytes counterpart, in place; returns `model`.

    kind "nf4" / "fp4": `Linear4bit`, blocksize 64, compute dtype = the layer's dtype, double
    quantization of the absmax only if asked; "int8": `Linear8bitLt` (LLM.int8(), threshold 6.0,
    has_fp16_weights=False). Weights are quantized on the device the model is on."""
    check_kind(kind)
    b = _import()
    targets = {n: m for n, m in linears(model).items()
               if not isinstance(m, (b.nn.Linear4bit, b.nn.Linear8bitLt))}
    if not targets:
        raise CompressError("the model has no dense Linear inside its blocks for bitsandbytes to replace")
    first = next(iter(targets.values()))
    device, dtype = first.weight.device, first.weight.dtype
    if kind == "int8" and dtype != torch.float16:
        _quiet_int8_cast_warning()
        log.info("bitsandbytes int8 casts %s activations to float16 for the int8 matmul", dtype)
    _probe(b, kind, device, dtype, double_quant)
    ragged = sorted({m.in_features for m in targets.values() if m.in_features % BLOCKSIZE})
    if kind != "int8" and ragged:
        _check_ragged(b, kind, ragged[0], device, dtype, double_quant)
    for name, lin in targets.items():
        set_module(model, name, _convert(b, lin, kind, lin.weight.device, double_quant))
    code, total = bits(model, kind, double_quant=double_quant) or (0.0, 0.0)
    log.info("bitsandbytes %s %s: %d Linears on %s, %.3f code bits / %.3f with scales per weight",
             b.__version__, kind, len(targets), device, code, total)
    return model


def bnb_bits(kind: str, N: int, K: int, *, double_quant: bool = False) -> tuple[float, float]:
    """(code bits, code + scale bits) per weight of one [N, K] Linear as bitsandbytes 0.45-0.50 stores it
    (read from bitsandbytes 0.50's `Params4bit` / `Int8Params`).

    nf4 / fp4 (`Params4bit`): two 4-bit codes per uint8 over the flattened weight, and one fp32 absmax
    per block of 64 consecutive weights: 4 and 4 + 32/64 = 4.5. With double quantization the absmax are
    stored as uint8 plus one fp32 absmax per 256 blocks: 4 + 8/64 + 32/(64·256) ≈ 4.127.
    int8 (`Int8Params`, has_fp16_weights=False): int8 codes `CB` [N, K] and one fp32 absmax per row
    `SCB` [N] (LLM.int8()'s outliers are activation columns picked at run time, nothing is stored for
    them): 8 and 8 + 32/K. Per-layer constants (the 16-entry fp32 4-bit codebook, the nested
    256-entry codebook and offset) are left out, like the layer shapes."""
    check_kind(kind)
    n = N * K
    if kind == "int8":
        return 8.0, (8.0 * n + 32.0 * N) / n
    code = 8.0 * math.ceil(n / 2)
    blocks = math.ceil(n / BLOCKSIZE)
    scales = 8.0 * blocks + 32.0 * math.ceil(blocks / 256) if double_quant else 32.0 * blocks
    return code / n, (code + scales) / n


def bits(model: nn.Module, kind: str, *, double_quant: bool = False) -> tuple[float, float] | None:
    """`bnb_bits` averaged by element count over the Linears `bnb` replaces (before or after it ran)."""
    numel = code = total = 0.0
    for lin in linears(model).values():
        n = lin.in_features * lin.out_features
        c, t = bnb_bits(kind, lin.out_features, lin.in_features, double_quant=double_quant)
        numel, code, total = numel + n, code + c * n, total + t * n
    return (code / numel, total / numel) if numel else None
