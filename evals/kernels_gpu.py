"""GPU kernel benchmark: packed matmul kernels vs fp16 dense on the decode shapes of Llama-7B and 13B layers.

For every layer shape (N x K) and format (w4 g128, w3 g128, w2 g64 asymmetric; binary per row with 10 %
salient weights), times each backend with `triton.testing.do_bench` (median) and prints: microseconds,
achieved GB/s (bytes of the packed operands + x + y over the time), % of the device's bandwidth (a
device-to-device copy of 1 GiB measured first, or --peak-gbs), the speedup over `F.linear` in fp16 on the
same shape, and the ideal speedup 16 / (code bits + metadata bits per weight) that a purely
bandwidth-bound kernel would reach. Backends: the CUDA GEMV (batch 1; 2-4 bits and binary) and Triton at
batch 1 and batch 16. Writes evals/results/kernels_gpu.{json,md}.

    python evals/kernels_gpu.py                          # needs a CUDA device
    python evals/kernels_gpu.py --models 7b --peak-gbs 2039
    python evals/kernels_gpu.py --device cpu --models tiny   # smoke run of the script itself (reference op)

On a machine without a GPU only the smoke run works: its timings are the reference op's, not a kernel's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from compress import format as fmt

SHAPES: dict[str, list[tuple[str, int, int]]] = {  # model -> (layer, N = out_features, K = in_features)
    "7b": [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)],
    "13b": [("q/k/v/o", 5120, 5120), ("gate/up", 13824, 5120), ("down", 5120, 13824)],
    "tiny": [("smoke", 256, 576)],
}
FORMATS: dict[str, tuple[int, int]] = {"w4 g128": (4, 128), "w3 g128": (3, 128), "w2 g64": (2, 64),
                                       "binary 10%": (1, 0)}  # binary: one alpha and mu per row
SALIENT = 0.10


def operands(fmt_name: str, N: int, K: int, device: torch.device) -> tuple[tuple, float]:
    """Random packed operands of one format and their metadata bits per weight (scales, zeros, salient)."""
    bits, g = FORMATS[fmt_name]
    gen = torch.Generator().manual_seed(N * 7 + K)
    if fmt_name.startswith("binary"):
        signs = fmt.pack(torch.randint(0, 2, (N, K), generator=gen).to(torch.uint8), 1)
        alpha = torch.rand(N, 1, generator=gen).half() * 0.02
        mu = torch.randn(N, 1, generator=gen).half() * 0.002
        mask = torch.rand(N, K, generator=gen) < SALIENT
        rowptr = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)]).to(torch.int32)
        col = torch.nonzero(mask)[:, 1].to(torch.int32)
        delta = torch.randn(len(col), generator=gen) * 0.01
        ops = tuple(t.to(device) if isinstance(t, torch.Tensor) else t
                    for t in (signs, alpha, mu, K, rowptr, col, delta))
        # as the kernel reads it: 32 bits of column + delta per salient weight, rowptr, alpha and mu per row
        meta = (len(col) * 64 + (N + 1) * 32 + N * 32) / (N * K)
        return ops, meta
    G = math.ceil(K / g)
    qweight = fmt.pack(torch.randint(0, 2**bits, (N, K), generator=gen).to(torch.uint8), bits)
    scale = (torch.rand(N, G, generator=gen) * 0.02).half()
    zero = torch.randint(0, 2**bits, (N, G), generator=gen).to(torch.uint8)
    return (qweight.to(device), scale.to(device), zero.to(device), bits, g), (16 + 8) / g


def nbytes(*ts: object) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of a call: triton's do_bench on a GPU, a perf_counter loop on a CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu_bench(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_bench


def dense_call(x: torch.Tensor, w16: torch.Tensor) -> Callable[[], torch.Tensor]:
    """fp16 F.linear on a GPU; fp32 on a CPU (no fast fp16 matmul there)."""
    if x.is_cuda:
        return lambda: F.linear(x, w16)
    xf, wf = x.float(), w16.float()
    return lambda: F.linear(xf, wf)


def copy_bandwidth(device: torch.device, bench: Callable) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write): the practical peak the table compares with."""
    n = 2**30 // 2 if device.type == "cuda" else 2**24
    src = torch.empty(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def backends(fmt_name: str, device: torch.device) -> dict[str, tuple[int, Callable[..., torch.Tensor]]]:
    """name -> (batch M, fn(x, *operands))."""
    binary = fmt_name.startswith("binary")
    if device.type != "cuda":
        op = torch.ops.compress.binary_matmul if binary else torch.ops.compress.wq_matmul
        return {"reference op, M=1": (1, op)}
    from compress.kernels import triton_wq
    from compress.kernels.cuda import build

    tri = triton_wq.binary_matmul if binary else triton_wq.wq_matmul
    out = {}
    if build.load() is not None:
        out["cuda gemv, M=1"] = (1, build.binary_gemv if binary else build.wq_gemv)
    else:
        print(f"CUDA GEMV skipped: {build.unavailable_reason()}", file=sys.stderr)
    out["triton, M=1"] = (1, tri)
    out["triton, M=16"] = (16, tri)
    return out


def run(models: list[str], device: torch.device, peak: float | None) -> tuple[list[dict], float]:
    from compress.kernels import ops  # noqa: F401  (registers torch.ops.compress.*)

    bench = timer(device)
    peak = peak or copy_bandwidth(device, bench)
    rows = []
    for model in models:
        for layer, N, K in SHAPES[model]:
            dense_ms = {}
            w16 = torch.randn(N, K, device=device).half()
            for M in (1, 16):
                x = torch.randn(M, K, device=device).half()
                dense_ms[M] = bench(dense_call(x, w16))
                rows.append({"model": model, "layer": layer, "N": N, "K": K, "format": "fp16 dense",
                             "backend": f"F.linear, M={M}", "M": M, "ms": dense_ms[M],
                             "bytes": nbytes(w16, x) + M * N * 2, "ideal": 1.0})
            del w16
            for fmt_name in FORMATS:
                args, meta = operands(fmt_name, N, K, device)
                bits = FORMATS[fmt_name][0]
                for name, (M, fn) in backends(fmt_name, device).items():
                    x = torch.randn(M, K, device=device).half()
                    try:
                        ms = bench(lambda fn=fn, x=x, args=args: fn(x, *args))
                    except Exception as e:  # one backend's failure must not lose the table
                        print(f"{model} {layer} {fmt_name} {name}: {type(e).__name__}: {e}", file=sys.stderr)
                        continue
                    rows.append({"model": model, "layer": layer, "N": N, "K": K, "format": fmt_name, "backend": name,
                                 "M": M, "ms": ms, "bytes": nbytes(*args, x) + M * N * 2, "ideal": 16 / (bits + meta),
                                 "speedup": dense_ms[M] / ms})
    for r in rows:
        r["gbs"] = r["bytes"] / (r["ms"] * 1e-3) / 1e9
        r["peak_pct"] = 100 * r["gbs"] / peak
        r.setdefault("speedup", 1.0)
    return rows, peak


def table(rows: list[dict], peak: float, device_name: str) -> str:
    lines = [f"Device: {device_name}; bandwidth reference {peak:.0f} GB/s.", "",
             "| model | layer | N x K | format | backend | µs | GB/s | % of peak | speedup vs fp16 | ideal |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['N']} x {r['K']} | {r['format']} | {r['backend']} | "
                     f"{r['ms'] * 1e3:.1f} | {r['gbs']:.0f} | {r['peak_pct']:.0f}% | {r['speedup']:.2f}x | "
                     f"{r['ideal']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", choices=list(SHAPES), default=["7b", "13b"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--peak-gbs", type=float, default=None, help="the device's bandwidth (default: measured copy)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels_gpu")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("evals/kernels_gpu.py needs a CUDA device (none visible); use --device cpu --models tiny "
                         "for a smoke run of the script")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run: reference op timings)"
    rows, peak = run(args.models, device, args.peak_gbs)
    md = table(rows, peak, name)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"device": name, "peak_gbs": peak, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(f"# Packed kernels vs fp16 dense\n\nCommand: `python evals/kernels_gpu.py "
                                           f"--models {' '.join(args.models)}`.\n\n{md}\n")


if __name__ == "__main__":
    main()
