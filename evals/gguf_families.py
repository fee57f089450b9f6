"""Does llama.cpp run our GGUFs of every architecture the writer knows the way we do? (issue 20)

For each of llama, mistral, qwen2 (q/k/v biases), qwen3 (per-head q/k norms): a tiny randomly initialised model
(hidden 256, 2 blocks, 4/2 heads, initialiser std 0.2 so that its next-token distributions are sharp and a wrong
tensor layout shows), compressed with gguf-q8_0 on random calibration tokens, written as GGUF, then scored on the
same 4 windows of 64 pydoc tokens by our model (torch) and by llama.cpp (llama-cpp-python, evals/llamacpp.py):
mean NLL per token of each, and the share of positions of window 0 whose argmax agrees. A writer bug (a q/k rotary
permutation missing, a bias or norm dropped) moves llama.cpp's NLL far from ours; Q8_0's activation rounding in
llama.cpp moves it a little.

    python evals/gguf_families.py          # prints the table, writes evals/results/gguf_families.{json,md}
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import llamacpp  # noqa: E402


def main() -> None:
    import torch
    from helpers import tiny_tokenizer
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    import compress
    from compress import recipe
    from compress.data import pydoc_text
    from compress.export import gguf as gguf_export

    torch.set_num_threads(2)
    tok = tiny_tokenizer()
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=384, max_position_embeddings=256, initializer_range=0.2)
    families = {"llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
                "mistral": (MistralConfig, MistralForCausalLM, {}),
                "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
                "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 64})}
    ids = tok(pydoc_text()[:20000]).input_ids
    windows = [ids[i * 64:(i + 1) * 64] for i in range(4)]
    rows = []
    for name, (cfg_cls, model_cls, extra) in families.items():
        torch.manual_seed(0)
        model = model_cls(cfg_cls(**shape, **extra)).eval()
        rec = recipe.load("gguf-q8_0", ["calibrate.dataset=random", "calibrate.samples=8", "calibrate.seqlen=64"])
        res = compress.compress(model, tok, rec)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor(windows)).logits.double(), -1)
        x = torch.tensor(windows)
        ours = float(-lp[:, :-1].gather(-1, x[:, 1:, None]).mean())
        ours_argmax = lp[0].argmax(-1).tolist()
        with tempfile.TemporaryDirectory() as d:
            path = gguf_export.write(model, tok, res.plan, Path(d), dtype=torch.float32, recipe=rec)
            theirs = llamacpp.perplexity(path, windows, n_ctx=64)
        agree = sum(a == b for a, b in zip(ours_argmax, theirs["argmax0"], strict=False)) / len(ours_argmax)
        rows.append({"family": name, "ours_nll": ours, "llama_cpp_nll": theirs["nll"], "argmax_agree": agree})
        print(f"{name}: ours {ours:.4f}, llama.cpp {theirs['nll']:.4f}, argmax agreement {agree:.3f}", flush=True)
    out = HERE / "results" / "gguf_families"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    md = ["| family | NLL/token (ours, torch) | NLL/token (llama.cpp) | argmax agreement (window 0) |",
          "|---|---:|---:|---:|"] + [f"| {r['family']} | {r['ours_nll']:.4f} | {r['llama_cpp_nll']:.4f} | "
                                     f"{r['argmax_agree']:.3f} |" for r in rows]
    text = "\n".join(md)
    print(text)
    out.with_suffix(".md").write_text(f"# llama.cpp runs our GGUFs as we do (tiny models, gguf-q8_0)\n\n"
                                      f"{__doc__.split(chr(10) + chr(10))[1]}\n\n{text}\n")


if __name__ == "__main__":
    main()
