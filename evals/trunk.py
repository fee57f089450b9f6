"""Trunk benchmark: SmolLM2-135M on the pydoc-512 protocol (../shared/protocol.md).

Dense perplexity, then RTN / GPTQ / GPTQ+act-order at w4 g128, w3 g128, w2 g64 (asymmetric, fp16 scales),
each compression in its own process so that its wall time and peak RSS are its own. Evaluation: 40
windows x 512 tokens from the start of the pydoc topics (sorted keys); calibration: 128 x 512 from
token 30720 on (windows 60..187, disjoint). Prints a table and writes evals/results/trunk.{json,md}.

    python evals/trunk.py                                 # everything (about 1.5 h on 2 CPU cores)
    python evals/trunk.py --rows "gptq w4g128" "rtn w4g128"  # some rows (the others are kept)
    python evals/trunk.py --render                        # re-print the table from the saved JSON
"""

from __future__ import annotations

from common import cli, fmt_num, fmt_ppl, grid_spec

SETTINGS = {"w4g128": (4, 128), "w3g128": (3, 128), "w2g64": (2, 64)}
METHODS = {
    "rtn": ("rtn-4bit", []),
    "gptq": ("gptq-4bit", ["round.act_order=false"]),
    "gptq+act-order": ("gptq-4bit", ["round.act_order=true"]),
}
REFERENCE = {  # ../shared/protocol.md: our RTN figures (fp32 scales) and IST-DASLab/gptq under the same protocol
    "dense": 14.007, "rtn w4g128": 18.736, "rtn w3g128": 81.727, "rtn w2g64": 4.4e5,
    "gptq w4g128": 18.09, "gptq w3g128": 32.07, "gptq w2g64": 2555,
}
ORDER = ["dense"] + [f"{m} {s}" for s in SETTINGS for m in METHODS]


def spec_of(label: str) -> dict:
    return grid_spec(label, METHODS, SETTINGS)


def table(rows: list[dict]) -> str:
    lines = ["| setting | method | ppl | reference ppl | KL / token | top-1 | bits (codes / +meta) | "
             "layer loss | compress s | peak RSS MB |", "|" + "---|" * 10]
    for r in rows:
        method, _, setting = r["label"].partition(" ")
        bits = f"{r['bits_code']:.2f} / {r['bits_total']:.3f}" if "bits_code" in r else "32 (fp32)"
        lines.append(
            f"| {setting or '-'} | {method} | {fmt_ppl(r['ppl'])} | {fmt_ppl(REFERENCE.get(r['label']))} | "
            f"{fmt_num(r.get('kl'), '.4f')} | {fmt_num(r.get('top1'), '.2%')} | {bits} | "
            f"{fmt_num(r.get('layer_loss'), '.4g')} | {fmt_num(r.get('compress_seconds'), '.0f')} | "
            f"{fmt_num(r.get('peak_rss_mb'), '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    cli(__doc__, ORDER[1:], table, "Trunk benchmark: SmolLM2-135M, pydoc-512 protocol",
        "Command: `python evals/trunk.py`. Evaluation 40 x 512 tokens from the start of the pydoc topics; "
        "calibration 128 x 512 (windows 60..187). Asymmetric grids, fp16 scales, groups along in_features. "
        "Reference ppl: ../shared/protocol.md (RTN: ours with fp32 scales; GPTQ: IST-DASLab/gptq, act-order off). "
        "Peak RSS is the compressing process's (model load + compression), measured before the dense copy "
        "for KL is loaded.", __file__, "trunk", spec_of=spec_of)

if __name__ == "__main__":
    main()
