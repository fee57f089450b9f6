"""Binarization benchmark: plain binarization vs PB-LLM (salient fractions, magnitude vs Hessian salience,
with and without GPTQ-PB error feedback) on SmolLM2-135M, pydoc-512 protocol (the trunk benchmark's
evaluation). Bits per weight are counted as stored: signs + salient index + 8-bit values (+ alpha, mu and
the 8-bit grid); bytes on disk are the whole checkpoint's weight files (embeddings and lm_head stay dense,
so they dominate at this model size). Writes evals/results/binarize.{json,md}.

    python evals/binarize.py                       # every row (hours on 2 CPU cores)
    python evals/binarize.py --rows "binary" "gptq-pb hessian 10%"
"""

from __future__ import annotations

from common import cli, fmt_num, fmt_ppl


def _pb(frac: int, metric: str, feedback: bool) -> tuple[str, list[str]]:
    return ("pbllm-10", [f"weights.salient={frac / 100}", f"round.metric={metric}", f"round.feedback={feedback}"])


ROWS: dict[str, tuple[str, list[str]]] = {"binary": ("binary", [])}
for _f in (10, 20, 30):
    ROWS[f"pb-llm magnitude {_f}%"] = _pb(_f, "magnitude", False)
    ROWS[f"pb-llm hessian {_f}%"] = _pb(_f, "hessian", False)
    ROWS[f"gptq-pb magnitude {_f}%"] = _pb(_f, "magnitude", True)
    ROWS[f"gptq-pb hessian {_f}%"] = _pb(_f, "hessian", True)


def table(rows: list[dict]) -> str:
    lines = ["| method | bits (payload / total) | ppl | KL / token | top-1 | checkpoint MB | compress s | "
             "peak RSS MB |", "|" + "---|" * 8]
    for r in rows:
        if r["label"] == "dense":
            lines.append(f"| dense | 32 | {fmt_ppl(r['ppl'])} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {r['label']} | {r['bits_code']:.3f} / {r['bits_total']:.3f} | {fmt_ppl(r['ppl'])} | "
            f"{fmt_num(r['kl'], '.4f')} | {fmt_num(r['top1'], '.2%')} | {fmt_num(r.get('disk_mb'), '.1f')} | "
            f"{r['compress_seconds']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    cli(__doc__, ROWS, table, "Binarization benchmark: SmolLM2-135M, pydoc-512 protocol",
        "Command: `python evals/binarize.py`. Every Linear of the blocks binarized (mu + alpha·sign per row) "
        "except the salient fraction, kept on a per-row 8-bit grid; 128 x 512 pydoc calibration windows. "
        "pb-llm = no error feedback (the paper's RTN rows), gptq-pb = GPTQ column sweep with feedback.",
        __file__, "binarize", save=True)


if __name__ == "__main__":
    main()
