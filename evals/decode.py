"""CPU decode benchmark: greedy tokens/s and peak RSS of SmolLM2-135M, dense vs packed, one process per row.

Checkpoints are made once into evals/.cache/decode (a dense safetensors copy of the GGUF model, RTN packed
copies and a PB-LLM one (binary + 10 % salient, no error feedback): the rounding method does not change the
speed), then every row loads its checkpoint with
`from_pretrained` in a fresh process, decodes `--tokens` tokens greedily after a 64-token prompt with the KV
cache, and reports decode tokens/s (prefill excluded), the process's peak RSS and the kernel backend that ran.
Packed rows take the CPU backend by default, in every dtype: the packed GEMV (kernels/cpu_gemv.cpp) for the
decode steps, the int4 tinygemm matmul for a bf16 prompt of widths <= 4, the tiled C++ decode + one fp32 matmul
for fp32 prompts and wider codes (PB-LLM: the 1-bit GEMV plus the salient correction, its grid decoded in tiles
for the prompt); "default load" is `from_pretrained(dir)` with no dtype of a checkpoint saved as the CLI saves it
(dense parts bf16); "reference" rows force COMPRESS_KERNEL=reference (dequantize each layer per call).
The fidelity columns compare the row's
next-token logits on the prompt with the reference path of the same checkpoint in fp32.
Writes evals/results/decode.{json,md}; the prompt logits stay in evals/.cache/decode/logits.

    python evals/decode.py            # every row (minutes; run it alone: timings need a quiet machine)
    python evals/decode.py --render
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import merge, report

CACHE = Path(__file__).parent / ".cache" / "decode"
ROWS: dict[str, tuple[str, str, str | None]] = {  # label -> (checkpoint, dtype, forced backend)
    "dense fp32": ("dense", "float32", None),
    "dense bf16": ("dense", "bfloat16", None),
    "packed w4g128, default load": ("rtn-w4g128-saved", "auto", None),
    "packed w4g128, fp32 (reference)": ("rtn-w4g128", "float32", "reference"),
    "packed w4g128, fp32 (cpu)": ("rtn-w4g128", "float32", None),
    "packed w4g128, bf16 (cpu)": ("rtn-w4g128", "bfloat16", None),
    "packed w3g128, bf16 (cpu)": ("rtn-w3g128", "bfloat16", None),
    "packed w8g128, bf16 (cpu)": ("rtn-w8g128", "bfloat16", None),
    "pb-llm 10%, fp32 (reference)": ("pbllm-10", "float32", "reference"),
    "pb-llm 10%, bf16 (cpu)": ("pbllm-10", "bfloat16", None),
}
PACKED: dict[str, tuple[str, list[str]]] = {  # checkpoint -> (recipe, edits); the rounding does not change the speed
    "rtn-w4g128": ("rtn-4bit", ["weights.bits=4"]),
    "rtn-w3g128": ("rtn-4bit", ["weights.bits=3"]),
    "rtn-w8g128": ("rtn-4bit", ["weights.bits=8"]),
    "pbllm-10": ("binary", ["weights.salient=0.1", "calibrate.samples=16"]),  # binary + 10 % salient, no feedback
}
PREFILL = 512  # tokens of the prefill timing (one forward, no cache)
REFERENCES = {"dense": "dense fp32", "rtn-w4g128": "packed w4g128, fp32 (reference)",
              "rtn-w4g128-saved": "packed w4g128, fp32 (reference)",
              "pbllm-10": "pb-llm 10%, fp32 (reference)"}


def make_checkpoints() -> None:
    import compress
    from compress import checkpoint, models, recipe

    ref = models.resolve("smollm2-135m")
    if not (CACHE / "dense" / "config.json").is_file():
        model, tok = models.load(ref)
        model.save_pretrained(CACHE / "dense")
        tok.save_pretrained(CACHE / "dense")
    for name, (recipe_name, edits) in PACKED.items():
        if not (CACHE / name / "config.json").is_file():
            model, tok = models.load(ref)
            rec = recipe.load(recipe_name, edits)
            res = compress.compress(model, tok, rec)
            checkpoint.save(model, tok, res.plan, res.recipe, CACHE / name, card=f"decode benchmark: {name}")
            if name == "rtn-w4g128":  # the same codes as the CLI saves them: dense parts in bf16 (--save-dtype auto)
                checkpoint.save(model, tok, res.plan, res.recipe, CACHE / f"{name}-saved", card="decode benchmark",
                                dtype=models.stored_dtype(ref))


def job(label: str, tokens: int) -> dict:
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compress  # noqa: F401  (registers the quantization method)
    from compress import kernels
    from compress.nn import CompressedLinear
    from compress.util import peak_rss_mb

    torch.set_num_threads(2)
    ckpt, dtype, forced = ROWS[label]
    if forced:
        os.environ[kernels.ENV] = forced
    path = CACHE / ckpt
    tok = AutoTokenizer.from_pretrained(path)
    kw = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}  # "auto": what from_pretrained(dir) does
    model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics)[:8])  # the start of the corpus the other benchmarks use
    long = tok(text, return_tensors="pt").input_ids[:, :PREFILL]
    prompt = long[:, :64]
    packed = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    backend = "dense"
    if packed:
        from compress.kernels import cpu

        one, many = (torch.zeros(n, packed[0].in_features, dtype=model.dtype) for n in (1, PREFILL))
        backend = kernels.choose(packed[0], one)
        if backend == "cpu":
            backend = f"cpu: {cpu.path(packed[0], one)} / {cpu.path(packed[0], many)}"
    with torch.no_grad():
        model(long)  # warm-up of the prefill path
        t0 = time.perf_counter()
        model(long)
        prefill_tps = long.shape[1] / (time.perf_counter() - t0)
        logits = model(prompt).logits[0, -1].float()
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up (prepares the int4 copies)
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        total = time.perf_counter() - t0
    return {"label": label, "tokens": tokens, "tokens_per_s": (tokens - 1) / (total - prefill),
            "prefill_tokens_per_s": prefill_tps, "dtype": str(model.dtype).removeprefix("torch."),
            "peak_rss_mb": peak_rss_mb(), "backend": backend,
            "logits": logits.tolist(), "text": tok.decode(out[0, 64:])[:80]}


def reference_of(label: str) -> str | None:
    """The fp32 reference row a row's prompt logits are compared with (None: not compared)."""
    return REFERENCES.get(ROWS[label][0])


def fidelity(row: dict) -> None:
    """Keep the row's prompt logits in the cache (not in the results file) and record its relative L2 error and
    argmax match against its reference row's logits, when those are there."""
    import torch
    from safetensors.torch import load_file, save_file

    logits = CACHE / "logits"
    logits.mkdir(parents=True, exist_ok=True)
    save_file({"logits": torch.tensor(row.pop("logits"))}, logits / f"{row['label']}.safetensors")
    ref = reference_of(row["label"])
    if ref is not None and (logits / f"{ref}.safetensors").is_file():
        a, b = (load_file(logits / f"{n}.safetensors")["logits"] for n in (row["label"], ref))
        row["rel_err"], row["same_token"] = float((a - b).norm() / b.norm()), bool(a.argmax() == b.argmax())


def table(rows: list[dict]) -> str:
    dense = next((r["tokens_per_s"] for r in rows if r["label"] == "dense fp32"), None)
    bf16 = next((r for r in rows if r["label"] == "dense bf16"), None)
    lines = ["| row | dtype | backend (decode / prefill) | decode tokens/s | vs dense fp32 | vs dense bf16 | "
             f"prefill tokens/s ({PREFILL}) | prefill vs dense bf16 | peak RSS MB | "
             "logits rel. err vs fp32 reference | same next token |", "|" + "---|" * 11]
    for r in rows:
        speed = f"{r['tokens_per_s'] / dense:.2f}x" if dense else "-"
        vs = f"{r['tokens_per_s'] / bf16['tokens_per_s']:.2f}x" if bf16 else "-"
        pre = r.get("prefill_tokens_per_s")
        pvs = f"{pre / bf16['prefill_tokens_per_s']:.2f}x" if pre and bf16 and "prefill_tokens_per_s" in bf16 else "-"
        e = (r["rel_err"], r["same_token"]) if "rel_err" in r else None
        lines.append(f"| {r['label']} | {r.get('dtype', '-')} | {r['backend']} | {r['tokens_per_s']:.1f} | {speed} | "
                     f"{vs} | {'-' if pre is None else f'{pre:.0f}'} | {pvs} | {r['peak_rss_mb']:.0f} | "
                     f"{'-' if e is None else f'{e[0]:.2e}'} | {'-' if e is None else e[1]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.job:
        print(json.dumps(job(args.job, args.tokens)))
        return
    saved = args.out.with_suffix(".json")
    rows = json.loads(saved.read_text()) if saved.is_file() else []
    if not args.render:
        make_checkpoints()
        for label in args.rows:
            p = subprocess.run([sys.executable, __file__, "--job", label, "--tokens", str(args.tokens)],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"{label} failed:\n{p.stderr[-3000:]}")
            new = json.loads(p.stdout.strip().splitlines()[-1])
            fidelity(new)
            print(f"{label}: {new['tokens_per_s']:.1f} tokens/s ({new['backend']})", flush=True)
            rows = merge(saved, new, list(ROWS))
    report(args.out, "CPU decode benchmark: SmolLM2-135M", "Command: `python evals/decode.py`. Greedy decoding of "
           f"{rows[0]['tokens'] if rows else '-'} tokens after a 64-token pydoc prompt, KV cache, batch 1, 2 CPU "
           "threads, one process per row; checkpoints loaded with from_pretrained (the default load: no dtype given, "
           f"the checkpoint's own bf16); prefill: one {PREFILL}-token forward without cache; embeddings and lm_head "
           "stay dense in the row's dtype.", table(rows))


if __name__ == "__main__":
    main()
