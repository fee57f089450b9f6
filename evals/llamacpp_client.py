"""Runs inside evals/.cache/venvs/llamacpp (llama-cpp-python, no compress, no torch): llama.cpp's perplexity of a
GGUF model on given token windows, the pydoc-512 protocol's way (see evals/llamacpp.py).

    python llamacpp_client.py REQUEST.json RESULT.json

REQUEST: {"model": path, "windows": [[ids...], ...], "n_ctx": 512, "threads": 2, "repack": false, "flash_attn": true,
          "tokenize": optional text to tokenize with the GGUF's own tokenizer (no BOS, no special parsing)}
RESULT:  {"ppl", "nll" (mean per predicted token), "nll_sum", "tokens" (predicted), "seconds" (evaluation),
          "window_nll" (sum per window), "argmax0" (argmax of the logits at each position of the first window),
          "llama_cpp_python", "system_info", "repack", "use_extra_bufts", "flash_attn", "tokenized"?}
"""

import json
import sys
import time

import numpy as np


def main() -> None:
    req_file, out_file = sys.argv[1:]
    with open(req_file) as f:
        req = json.load(f)
    import llama_cpp
    import llama_cpp.llama_cpp as C

    if not req.get("repack", False):  # the library's equivalent of the tools' -nr: no CPU weight repacking
        default = C.llama_model_default_params

        def no_repack():
            p = default()
            p.use_extra_bufts = False
            return p

        C.llama_model_default_params = no_repack
    n_ctx = int(req.get("n_ctx", 512))
    windows = req["windows"]
    if max(len(w) for w in windows) > n_ctx:
        raise SystemExit(f"a window is longer than n_ctx={n_ctx}")
    threads = int(req.get("threads", 2))
    flash = bool(req.get("flash_attn", True))  # llama-perplexity's default on CPU (auto: on); without it, 2x slower
    llm = llama_cpp.Llama(model_path=req["model"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          flash_attn=flash, n_threads=threads, n_threads_batch=threads, verbose=False)
    out = {"llama_cpp_python": llama_cpp.__version__, "repack": bool(req.get("repack", False)),
           "system_info": C.llama_print_system_info().decode(errors="replace"),
           "use_extra_bufts": bool(llm.model_params.use_extra_bufts), "flash_attn": flash}
    total, count, per_window = 0.0, 0, []
    t0 = time.perf_counter()
    for i, w in enumerate(windows):
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)  # position t predicts token t+1
        if i == 0:
            out["argmax0"] = np.asarray(llm.scores[: len(w)]).argmax(axis=1).tolist()
        m = logits.max(axis=1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
        nll = float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
        per_window.append(nll)
        total += nll
        count += len(w) - 1
    out["seconds"] = time.perf_counter() - t0
    out |= {"nll_sum": total, "tokens": count, "nll": total / count, "ppl": float(np.exp(total / count)),
            "window_nll": per_window}
    if req.get("tokenize") is not None:
        out["tokenized"] = llm.tokenize(req["tokenize"].encode(), add_bos=False, special=False)
    with open(out_file, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
