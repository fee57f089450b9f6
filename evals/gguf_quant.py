"""GGUF benchmark: our rounding inside ggml's own blocks against llama.cpp's own quantizer, scored by llama.cpp.

    python evals/gguf_quant.py                          # every type and row (builds llama.cpp once, see llamacpp.py)
    python evals/gguf_quant.py --types q4_k_m --rows ours   # some rows again (the others are kept)
    python evals/gguf_quant.py --render

For SmolLM2-135M (the pydoc-512 protocol, ../shared/protocol.md), per llama.cpp ftype, each row is one GGUF file:
    llama.cpp            the f32 GGUF from llama.cpp's convert_hf_to_gguf.py -> llama-quantize at the ftype
    llama.cpp imatrix    the same with an importance matrix from llama-imatrix on our calibration text (the
                         protocol's 128 calibration windows decoded to text, which llama.cpp's tokenizer makes
                         127 chunks of 512; llama-imatrix's defaults, so the output matrix has no entry)
    ours                 `--recipe gguf-<ftype>`: the same per-tensor types (llama.cpp's mix rules), each block's
                         scales from the type's weighted search on diag(H), then GPTQ with act-order onto them
    ours baq             `--recipe gguf-baq-<ftype>`: a type per Linear from each type's measured GPTQ loss, at the
                         bits per weight of llama.cpp's mix (the same budget; the file may come out a little smaller)
    ours baq*            the same without q4_1 and q5_1 among the choices: this SmolLM2 is its Q4_1 GGUF dequantized,
                         so those two types hold it almost exactly, which the measuring allocator finds (the baq
                         row: q4_1 everywhere). Measured caveat: q5_k's shape fallback still brings q5_1 to the
                         576-wide rows (161 of 210 Linears), so this row is not free of the source grid either
Every file is scored by llama.cpp itself (llama-cpp-python, built from source): perplexity on the 40 protocol
windows of 512 tokens, fed as the same token ids, each window on its own. Bytes are the file's size; bits per
weight count every tensor's data (block metadata included) over all weights, as llama.cpp's loader prints.
"compress s" is llama-quantize's time for llama.cpp (the imatrix, about 4 minutes, is not in it) and the whole
compression (calibration, GPTQ, packing) for ours. Both pipelines start from the same fp32 weights (SmolLM2's
Q4_1 GGUF dequantized by transformers): llama.cpp from an f32 GGUF rather than bf16, so neither starts from a
rounded copy. The dense row is that f32 GGUF.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import llamacpp  # noqa: E402
from common import EVAL_WINDOWS, SEQLEN, fmt_num, fmt_ppl, merge, report  # noqa: E402

CACHE = HERE / ".cache" / "gguf"
TYPES = ["q4_k_m", "q3_k_m", "q2_k"]
ROWS = ["llama.cpp", "llama.cpp imatrix", "ours", "ours baq", "ours baq*"]
# SmolLM2 here is its Q4_1 GGUF dequantized: q4_1 (and q5_1, which holds every q4_1 grid) reproduce it almost
# exactly, which a measuring allocator finds; "ours baq*" leaves both out to show the allocation on its own merit
NOT_SOURCE = "[q2_k, q3_k, q4_0, q4_k, q5_0, q5_k, q6_k, q8_0]"


def protocol() -> tuple[object, object, list[list[int]], list[list[int]]]:
    """(dense fp32 model, tokenizer, eval windows, calibration windows) of the protocol."""
    import torch

    from compress import data, models

    torch.set_num_threads(2)
    model, tok = models.load(models.resolve("smollm2-135m"))
    ids = tok(data.pydoc_text()).input_ids
    windows = [ids[i * SEQLEN:(i + 1) * SEQLEN] for i in range(EVAL_WINDOWS)]
    calib = [ids[i * SEQLEN:(i + 1) * SEQLEN] for i in range(60, 188)]
    return model, tok, windows, calib


def sources(model: object, tok: object, calib: list[list[int]]) -> dict[str, Path]:
    """llama.cpp's inputs, made once: the HF folder, llama.cpp's f32 GGUF, the calibration text, the imatrix."""
    CACHE.mkdir(parents=True, exist_ok=True)
    hf = CACHE / "smollm2-hf"
    if not (hf / "config.json").is_file():
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
    f32 = CACHE / "smollm2-f32.gguf"
    if not f32.is_file():
        llamacpp.convert_hf(hf, f32, "f32")
    text = CACHE / "calibration.txt"
    if not text.is_file():
        text.write_text("".join(tok.decode(w) for w in calib), encoding="utf-8")
    imat = CACHE / "imatrix.gguf"
    if not imat.is_file():
        llamacpp.imatrix(f32, text, imat, chunks=len(calib))
    return {"hf": hf, "f32": f32, "text": text, "imatrix": imat}


def ours(model: object, tok: object, name: str, samples: int, edits: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """`--recipe <name>` (with `edits`) through the library, then the GGUF writer; (file, facts)."""
    import copy

    import compress
    from compress import recipe
    from compress.export import gguf as gguf_export
    from compress.util import peak_rss_mb

    rec = recipe.load(name, [f"calibrate.samples={samples}", *edits])
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    result = compress.compress(m, tok, rec)
    secs = time.perf_counter() - t0
    out = CACHE / (name + ("-x" if edits else ""))
    path = gguf_export.write(m, tok, result.plan, out, dtype=__import__("torch").float32, recipe=rec)
    return path, {"compress_seconds": secs, "peak_rss_mb": peak_rss_mb(), "layer_loss": result.total_loss,
                  "allocation": result.allocation}


def row(label: str, ftype: str, path: Path, windows: list[list[int]], extra: dict | None = None) -> dict:
    ppl = llamacpp.perplexity(path, windows)
    size = llamacpp.file_bpw(path)
    print(f"{ftype} {label}: ppl {ppl['ppl']:.3f}, {path.stat().st_size / 2**20:.2f} MiB", flush=True)
    return {"label": f"{ftype} · {label}", "ftype": ftype, "row": label, "file": str(path),
            "bytes": path.stat().st_size, "bpw": size["bpw"], "types": size.get("types"), "ppl": ppl["ppl"],
            "nll": ppl["nll"], "tokens": ppl["tokens"], **(extra or {})}


def table(rows: list[dict]) -> str:
    dense = next((r for r in rows if r["row"] == "dense"), None)
    out = []
    if dense:
        out.append(f"dense (llama.cpp's f32 GGUF): ppl {fmt_ppl(dense['ppl'])}, {dense['bytes'] / 2**20:.1f} MiB; "
                   f"our own dense f32 GGUF: ppl {fmt_ppl(dense.get('ours_ppl'))}\n")
    for ftype in dict.fromkeys(r["ftype"] for r in rows if r["row"] != "dense"):
        out += [f"### {ftype.upper()}", "", "| pipeline | file bytes | bits/weight | ppl (llama.cpp) | vs dense | "
                "compress s |", "|---|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["ftype"] == ftype):
            ratio = r["ppl"] / dense["ppl"] if dense else float("nan")
            out.append(f"| {r['row']} | {r['bytes']:,} | {r['bpw']:.4f} | {fmt_ppl(r['ppl'])} | {ratio:.3f}x | "
                       f"{fmt_num(r.get('compress_seconds'), '.0f')} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--rows", nargs="*", default=["dense", *ROWS])
    ap.add_argument("--samples", type=int, default=128, help="our calibration windows (the protocol's 128)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gguf_quant")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    saved = args.out.with_suffix(".json")
    order = ["dense"] + [f"{t} · {r}" for t in TYPES for r in ROWS]
    if not args.render:
        model, tok, windows, calib = protocol()
        src = sources(model, tok, calib)
        if "dense" in args.rows:
            from compress.export import gguf as gguf_export

            r = row("dense", "dense", src["f32"], windows)
            ours_dense = gguf_export.write_dense(model, tok, CACHE / "ours-f32", dtype=__import__("torch").float32)
            r.update(label="dense", row="dense", ours_ppl=llamacpp.perplexity(ours_dense, windows)["ppl"],
                     ours_bytes=ours_dense.stat().st_size)
            merge(saved, r, order)
        for ftype in args.types:
            for label in [x for x in ROWS if x in args.rows]:
                if label.startswith("ours"):
                    name = f"gguf-{'baq-' if label.startswith('ours baq') else ''}{ftype}"
                    edits = (f"allocate.choices={NOT_SOURCE}",) if label == "ours baq*" else ()
                    path, extra = ours(model, tok, name, args.samples, edits)
                else:
                    imat = src["imatrix"] if label.endswith("imatrix") else None
                    path = CACHE / f"llamacpp-{ftype}{'-imatrix' if imat else ''}.gguf"
                    t0 = time.perf_counter()
                    llamacpp.quantize(src["f32"], path, ftype.upper(), imat)
                    extra = {"compress_seconds": time.perf_counter() - t0}
                merge(saved, row(label, ftype, path, windows, extra), order)
    rows = json.loads(saved.read_text())
    report(args.out, "GGUF: our rounding in ggml's blocks vs llama.cpp's quantizer (SmolLM2-135M, pydoc-512)",
           __doc__.split("\n\n", 2)[2].strip(), table(rows))


if __name__ == "__main__":
    main()
