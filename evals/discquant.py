"""DiscQuant benchmark: joint rounding against RTN and GPTQ on the same 3-bit symmetric g64 grid family,
SmolLM2-135M, pydoc-512 protocol (the trunk benchmark's evaluation: 40 x 512 tokens from token 0).

Every row compresses in its own process (its own wall time and peak RSS). DiscQuant rows differ only in
the number of optimiser steps, which shows how the result moves with steps. Writes
evals/results/discquant.{json,md}.

    python evals/discquant.py                          # every row (about two hours on 2 CPU cores)
    python evals/discquant.py --rows "discquant 64 steps"
    python evals/discquant.py --render
"""

from __future__ import annotations

from common import cli, fmt_num, fmt_ppl

GRID = ["weights.bits=3", "weights.group_size=64", "weights.symmetric=true"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "rtn": ("rtn-3bit", GRID),
    "gptq": ("gptq-3bit", GRID),
    "gptq (act-order off)": ("gptq-3bit", [*GRID, "round.act_order=false"]),
    "discquant 32 steps": ("discquant-3bit", ["round.steps=32", "round.warmup=4"]),
    "discquant 64 steps": ("discquant-3bit", ["round.steps=64", "round.warmup=8"]),
    "discquant 256 steps": ("discquant-3bit", []),
    "baq-discquant-3bit": ("baq-discquant-3bit", []),
}


def table(rows: list[dict]) -> str:
    lines = ["| method | bits (codes / +meta) | ppl | KL / token | top-1 | steps x windows (tokens) | "
             "train KL first → last | compress s | peak RSS MB |", "|" + "---|" * 9]
    for r in rows:
        if r["label"] == "dense":
            lines.append(f"| dense | 32 | {fmt_ppl(r['ppl'])} | - | - | - | - | - | - |")
            continue
        d = r.get("rounding") or {}
        steps = f"{d['steps']} x {d['windows_per_step']} ({d['tokens']})" if d else "-"
        kl = f"{d['train_kl'][0]:.4f} → {d['train_kl'][-1]:.4f}" if d.get("train_kl") else "-"
        lines.append(
            f"| {r['label']} | {r['bits_code']:.3f} / {r['bits_total']:.3f} | {fmt_ppl(r['ppl'])} | "
            f"{fmt_num(r['kl'], '.4f')} | {fmt_num(r['top1'], '.2%')} | {steps} | {kl} | "
            f"{r['compress_seconds']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    cli(__doc__, ROWS, table, "DiscQuant benchmark: SmolLM2-135M, pydoc-512 protocol",
        "Command: `python evals/discquant.py`. All rows: 3-bit symmetric min-max grid, groups of 64 along "
        "in_features, fp16 scales (3.25 bits per weight with scales), 128 x 512 pydoc calibration windows. "
        "DiscQuant: 2 windows of 512 tokens per step, lr 0.05, κ 1.0, ρ 200, full-vocabulary KL, random init. "
        "Train KL is the per-step KL(dense ‖ W_x) on that step's windows (before rounding).", __file__, "discquant")


if __name__ == "__main__":
    main()
