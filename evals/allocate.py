"""Allocation benchmark: BAQ and EvoPress against uniform GPTQ on SmolLM2-135M, pydoc-512 protocol.

Every row compresses in its own process (wall time and peak RSS are its own) and is scored on the same
40 x 512 pydoc windows as evals/trunk.py. Average bits are code bits over the compressed Linears by
element count; "+meta" adds the fp16 scales and uint8 zeros. Writes evals/results/allocate.{json,md}. The
EvoPress rows share their level database (evals/.cache/evopress-smollm2), so the first of them pays for it.

    python evals/allocate.py                  # every row (several hours on 2 CPU cores)
    python evals/allocate.py --rows baq-3bit  # some rows; the others are kept from earlier runs
    python evals/allocate.py --render
"""

from __future__ import annotations

from pathlib import Path

from common import cli, fmt_num, fmt_ppl

# The EvoPress rows share one teacher + level database (it does not depend on the target): built once.
DB = [f"allocate.database={Path(__file__).parent / '.cache' / 'evopress-smollm2'}"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "gptq uniform w3": ("gptq-3bit", []),
    "gptq uniform w2": ("gptq-2bit", ["weights.group_size=128"]),
    "baq-3bit (group)": ("baq-3bit", []),
    "baq-3bit (layer)": ("baq-3bit", ["allocate.granularity=layer"]),
    "baq-2.5bit (group)": ("baq-2.5bit", []),
    "baq-2.5bit (layer)": ("baq-2.5bit", ["allocate.granularity=layer"]),
    "evopress-3bit": ("evopress-3bit", DB),
    "baq-evopress-3bit": ("baq-evopress-3bit", DB),
    "evopress-2.5bit": ("evopress-2.5bit", DB),
    "evopress-2.5bit, 12 generations": ("evopress-2.5bit", [*DB, "allocate.generations=12"]),
    "baq-evopress-3bit, 8 generations": ("baq-evopress-3bit", [*DB, "allocate.generations=8"]),
    # 2 + 8 windows per candidate instead of 1 + 4: less noise per decision, 2.3x the search time
    "evopress-3bit, stages [3, 1024] [1, 4096]": ("evopress-3bit", [*DB, "allocate.stages=[[3, 1024], [1, 4096]]"]),
    "gptq uniform w3 per-row (act-order off)": ("gptq-3bit", ["weights.group_size=-1", "round.act_order=false"]),
    "baq-3bit-faithful": ("baq-3bit-faithful", []),
}


def reference(r: dict, rows: list[dict]) -> dict | None:
    """The uniform row at the same rate and grid that BAQ's predicted ratio is relative to (if it was run)."""
    faithful = r.get("allocation", {}).get("realised_rate") is not None
    uniform = {3.0: "gptq uniform w3", 2.0: "gptq uniform w2"}
    want = "gptq uniform w3 per-row (act-order off)" if faithful else uniform.get(round(r["bits_code"], 3))
    return next((x for x in rows if x["label"] == want and x is not r), None)


def table(rows: list[dict]) -> str:
    lines = ["| method | bits (codes / +meta) | ppl | KL / token | top-1 | widths (share of weights) | "
             "predicted layer-loss ratio | measured layer-loss / KL ratio | compress s | peak RSS MB |",
             "|" + "---|" * 10]
    for r in rows:
        if r["label"] == "dense":
            lines.append(f"| dense | 32 | {fmt_ppl(r['ppl'])} | - | - | - | - | - | - | - |")
            continue
        ref = reference(r, rows)
        measured = "-" if ref is None or ref["label"] == r["label"] else (
            f"{r['layer_loss'] / ref['layer_loss']:.3f} / {r['kl'] / ref['kl']:.3f}")
        widths = ", ".join(f"{w}: {s:.1%}" for w, s in r["widths"].items())
        pred = r.get("allocation", {}).get("predicted_loss_ratio")
        rate = r.get("allocation", {}).get("realised_rate")  # faithful BAQ: mean log2 of the level counts
        bits = f"{r['bits_code']:.3f} / {r['bits_total']:.3f}" + (f" (rate {rate:.3f})" if rate else "")
        lines.append(
            f"| {r['label']} | {bits} | {fmt_ppl(r['ppl'])} | "
            f"{fmt_num(r['kl'], '.4f')} | {fmt_num(r['top1'], '.2%')} | {widths} | {fmt_num(pred, '.3f')} | "
            f"{measured} | "
            f"{r['compress_seconds']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    cli(__doc__, ROWS, table, "Allocation benchmark: SmolLM2-135M, pydoc-512 protocol",
        "Command: `python evals/allocate.py`. All rows: g128 asymmetric grids, fp16 scales, GPTQ with act-order "
        "(static groups), 128 x 512 calibration windows. Predicted layer-loss ratio = BAQ's modelled Σ layer loss "
        "of the allocation over that of uniform bits at the target; measured = the row's Σ layer loss and KL over "
        "those of the uniform GPTQ row at the same code bits (and grid), where that row was run.", __file__, "allocate")


if __name__ == "__main__":
    main()
