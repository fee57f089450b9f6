"""What the checkpoint checks cost (issue 18): load time of a SmolLM2-135M checkpoint with and without
verification, `compress verify` on it, and the content digest of a 13 GB model folder (what resume's work
directory fingerprint and the eval cache hash).

The checkpoint is SmolLM2 rounded with RTN w4g128 (the rounding method does not change the files' size or the
checks) saved as the CLI saves it, made once into evals/.cache/verify. Every load runs in a fresh process (no
warm module state), `--repeats` times per row in alternating order, the median reported; the file is in the page
cache for all rows alike. The 13 GB folder is three shards of incompressible bytes written to `--scratch`
(default evals/.cache/verify/13gb, removed afterwards); it is hashed with the page cache warm and, where this
process may drop it (root on Linux), cold.

    python evals/verify_cost.py      # run it alone: timings need a quiet machine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).parent / ".cache" / "verify"
RESULTS = Path(__file__).parent / "results"
SHARDS = (4_700_000_000, 4_700_000_000, 3_600_000_000)  # 13.0 GB, Llama-2-13B's fp16 shards halved

LOAD = """
import sys, time
t0 = time.perf_counter()
import compress
from compress import checkpoint
t1 = time.perf_counter()
if sys.argv[2] == "inspect":
    checkpoint.inspect(sys.argv[1])
else:
    checkpoint.load(sys.argv[1], verify_digests=sys.argv[2] == "verify")
print(time.perf_counter() - t1)
"""


def make_checkpoint() -> Path:
    out = CACHE / "smollm2-rtn-w4g128"
    if (out / "checksums.json").is_file():
        return out
    import compress
    from compress import checkpoint, models, recipe

    ref = models.resolve("smollm2-135m")
    model, tok = models.load(ref)
    rec = recipe.load("rtn-4bit")
    result = compress.compress(model, tok, rec)
    checkpoint.save(model, tok, result.plan, rec, out, card="verify benchmark", dtype=models.stored_dtype(ref))
    return out


def time_loads(path: Path, repeats: int) -> dict[str, float]:
    modes = ["verify", "no-verify", "inspect"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    env = {**os.environ, "PYTHONPATH": ""}
    for r in range(repeats):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            out = subprocess.run([sys.executable, "-c", LOAD, str(path), mode], capture_output=True, text=True,
                                 check=True, env=env).stdout
            times[mode].append(float(out.strip().splitlines()[-1]))
    return {m: statistics.median(v) for m, v in times.items()}


def write_folder(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(64 << 20)
    files = []
    for i, size in enumerate(SHARDS):
        f = folder / f"model-{i + 1:05d}-of-{len(SHARDS):05d}.safetensors"
        files.append(f)
        if f.is_file() and f.stat().st_size == size:
            continue
        with open(f, "wb") as fh:
            left = size
            while left:
                n = min(len(block), left)
                fh.write(block[:n])
                left -= n
    return files


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def time_digest(files: list[Path]) -> dict[str, float | None]:
    from compress import digest

    out: dict[str, float | None] = {}
    digest.files_digest(files)  # warm the page cache
    t0 = time.perf_counter()
    digest.files_digest(files)
    out["warm"] = time.perf_counter() - t0
    out["cold"] = None
    if drop_caches():
        t0 = time.perf_counter()
        digest.files_digest(files)
        out["cold"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scratch", type=Path, default=CACHE / "13gb")
    ap.add_argument("--keep", action="store_true", help="keep the 13 GB folder")
    args = ap.parse_args()

    ckpt = make_checkpoint()
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    loads = time_loads(ckpt, args.repeats)
    files = write_folder(args.scratch)
    total = sum(f.stat().st_size for f in files)
    try:
        dig = time_digest(files)
    finally:
        if not args.keep:
            for f in files:
                f.unlink()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    rows = [
        ("load SmolLM2 w4g128 checkpoint, verified (structure + checksums + finite scales)", loads["verify"]),
        ("load, --no-verify (structure + finite scales only)", loads["no-verify"]),
        ("`compress verify` (no model load)", loads["inspect"]),
        ("cost of the checksums on load", loads["verify"] - loads["no-verify"]),
        (f"content digest of a {total / 1e9:.1f} GB folder ({len(files)} shards), page cache warm", dig["warm"]),
        (f"content digest of the {total / 1e9:.1f} GB folder, page cache dropped",
         dig["cold"] if dig["cold"] is not None else float("nan")),
    ]
    md = [f"# Cost of the checks (evals/verify_cost.py; {cpu}, {os.cpu_count()} cores, one run)", "",
          f"SmolLM2-135M checkpoint: {weights / 1e6:.1f} MB of safetensors; median of {args.repeats} fresh "
          f"processes per row (seconds after `import compress`).", "",
          "| what | seconds | rate |", "|---|---|---|"]
    for label, s in rows:
        rate = "-"
        if "digest" in label and s == s:
            rate = f"{total / s / 1e9:.2f} GB/s"
        elif label.startswith("cost"):
            rate = f"{weights / s / 1e9:.2f} GB/s" if s > 0 else "-"
        md.append(f"| {label} | {s:.3f} | {rate} |" if s == s else f"| {label} | not measured (no permission to "
                  "drop the page cache) | - |")
    text = "\n".join(md) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "verify.md").write_text(text)
    (RESULTS / "verify.json").write_text(json.dumps({"cpu": cpu, "weights_bytes": weights, "loads": loads,
                                                     "digest_bytes": total, "digest": dig}, indent=1))


if __name__ == "__main__":
    main()
