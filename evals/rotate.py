"""Rotation, GPTAQ, clipping and block reconstruction benchmark (issue 21): SmolLM2-135M on the pydoc-512 protocol.

Rows are GPTQ with act-order (static groups) at w4g128, w3g128, w2g64: plain; then each addition alone —
randomised Hadamard rotations fused into the weights (R1 on the residual stream + R2 per attention head;
compress/rotate.py), GPTAQ's asymmetric calibration (round.asymmetric, α 0.25), the clipping search
(round.clip), block-wise reconstruction (reconstruct: RECON below) — and all of them together. Each compression in
its own process (its own wall time and peak RSS). The rotated model's tied lm_head is untied and kept dense (bf16
on disk): "bpw +head" counts those 28.3M parameters at 16 bits over the Linears and the head together, the price
of R1 on a tied model; the "+head" rows round the head too (weights.lm_head, GPTQ w4g128 on its own inputs), and
their bits count it.

    python evals/rotate.py                      # every row (7 to 25 min a row on 2 CPU cores)
    python evals/rotate.py --rows "rotate w3g128" "all w3g128"
    python evals/rotate.py --render
"""

from __future__ import annotations

from common import cli, fmt_num, fmt_ppl, grid_spec

SETTINGS = {"w4g128": (4, 128), "w3g128": (3, 128), "w2g64": (2, 64)}
ACT = ["round.act_order=true"]  # every row: act-order with static groups
GPTAQ = ["round.asymmetric=0.25"]
CLIP = ["round.clip=true"]
RECON = ["reconstruct.epochs=4", "reconstruct.samples=32"]  # 128 steps of one window a block
RECON64 = ["reconstruct.epochs=4", "reconstruct.samples=64"]  # twice the windows (256 steps a block)
DENSE_HEAD = ["weights.lm_head=false", "overrides=[]"]  # the rotate-* recipes round the head: these rows keep it dense
DISTILL = ("distill={steps: 16, windows_per_step: 4, batch_size: 2, lr: 1.0e-3, warmup: 4, train: scales, "
           "topk: 256}")  # 64 of the 128 calibration windows, once each
HEAD = ["weights.lm_head=true", "overrides=[{match: lm_head, bits: 4, group_size: 128}]"]  # untied head, w4g128
METHODS = {  # label -> (recipe, edits on top of the setting's)
    "gptq": ("gptq-4bit", ACT),
    "rotate": ("rotate-gptq-4bit", [*ACT, *DENSE_HEAD]),
    "gptaq": ("gptq-4bit", [*ACT, *GPTAQ]),
    "clip": ("gptq-4bit", [*ACT, *CLIP]),
    "recon": ("gptq-4bit", [*ACT, *RECON]),
    "all": ("rotate-gptq-4bit", [*ACT, *GPTAQ, *CLIP, *RECON, *DENSE_HEAD]),
    "rotate+head": ("rotate-gptq-4bit", [*ACT, *HEAD]),
    "all+head": ("rotate-gptq-4bit", [*ACT, *GPTAQ, *CLIP, *RECON, *HEAD]),
    # twice the reconstruction's windows (256 steps a block): whether more data closes the 2-bit gap
    "all-64win": ("rotate-gptq-4bit", [*ACT, *GPTAQ, *CLIP, *RECON64, *DENSE_HEAD]),
    # the reconstruction's loss per token, relative to the target's norm (reconstruct.loss=token)
    "all-token": ("rotate-gptq-4bit", [*ACT, *GPTAQ, *CLIP, *RECON, "reconstruct.loss=token", *DENSE_HEAD]),
    "all-token-64win": ("rotate-gptq-4bit", [*ACT, *GPTAQ, *CLIP, *RECON64, "reconstruct.loss=token", *DENSE_HEAD]),
    # then the scales trained end to end toward the dense model's next-token distributions (EfficientQAT's E2E-QP)
    "all+distill": ("rotate-gptq-4bit", [*ACT, *GPTAQ, *CLIP, *RECON, *DENSE_HEAD, DISTILL]),
    "all-64win+distill": ("rotate-gptq-4bit", [*ACT, *GPTAQ, *CLIP, *RECON64, *DENSE_HEAD, DISTILL]),
    # BAQ's widths per group of 128 over {2, 3, 4, 8} at the setting's total bits per weight (spec_of), then all four
    "all-baq": ("rotate-baq-3bit-recon", [*ACT, *GPTAQ, *CLIP, *RECON, *DENSE_HEAD]),
}
ORDER = ["dense"] + [f"{m} {s}" for s in SETTINGS for m in METHODS]
TARGETS = {"w4g128": 16.73, "w3g128": 18.2, "w2g64": 35.0}  # issue 21: best peer at 4 bits, 1.3x and 2.5x dense


META_G128 = 0.203125  # bits of an fp16 scale + a zero point over a group of 128 (26 / 128, as the rows measure)
TOTALS = {"w4g128": 4 + META_G128, "w3g128": 3 + META_G128, "w2g64": 2.375}  # the uniform grids' bits per weight


def spec_of(label: str) -> dict:
    spec = grid_spec(label, METHODS, SETTINGS)
    if label.startswith("all-baq "):  # the allocation's groups are 128 wide, at the uniform grid's total bits
        code = TOTALS[label.split(" ")[1]] - META_G128  # w2g64: 2.172 code bits, the rest as 3 (4, 8) bits
        spec["edits"] += ["weights.group_size=128", f"allocate.target_bits={code:.4f}"]
    return spec


def table(rows: list[dict]) -> str:
    rows = with_trunk(rows)
    dense = next((r["ppl"] for r in rows if r["label"] == "dense"), None)
    lines = ["| setting | method | ppl | × dense | target | KL / token | top-1 | bits (codes / +meta) | bpw +head | "
             "compress s | peak RSS MB |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if r["label"] == "dense":
            lines.append(f"| dense | - | {fmt_ppl(r['ppl'])} | 1.000 | - | - | - | 32 (fp32) | - | - | - |")
            continue
        method, setting = r["label"].split(" ")
        method += " (trunk.json)" if r.get("from_trunk") else ""
        head = (r.get("rotation") or {}).get("untied_lm_head_params", 0)
        n = r.get("linear_params", 0)
        plus = (r["bits_total"] * n + 16 * head) / (n + head) if n and head and not r.get("head_planned") else (
            r["bits_total"])  # (a planned head is in bits_total already)
        lines.append(f"| {setting} | {method} | {fmt_ppl(r['ppl'])} | {r['ppl'] / dense:.3f} | {TARGETS[setting]} | "
                     f"{fmt_num(r.get('kl'), '.4f')} | {fmt_num(r.get('top1'), '.3f')} | "
                     f"{r['bits_code']:.3f} / {r['bits_total']:.3f} | {plus:.3f} | "
                     f"{fmt_num(r.get('compress_seconds'), '.0f')} | {fmt_num(r.get('peak_rss_mb'), '.0f')} |"
                     if dense else "")
    return "\n".join(lines)


def with_trunk(rows: list[dict]) -> list[dict]:
    """Plain GPTQ rows not measured in this run, taken from evals/results/trunk.json (GPTQ + act-order, the same
    protocol and code path; marked, and their seconds come from that run's machine)."""
    import json
    from pathlib import Path

    have = {r["label"] for r in rows}
    trunk = Path(__file__).parent / "results" / "trunk.json"
    old = {r["label"]: r for r in json.loads(trunk.read_text())} if trunk.is_file() else {}
    out = list(rows)
    for setting in SETTINGS:
        if f"gptq {setting}" not in have and f"gptq+act-order {setting}" in old:
            out.append({**old[f"gptq+act-order {setting}"], "label": f"gptq {setting}", "from_trunk": True})
    return sorted(out, key=lambda r: ORDER.index(r["label"]) if r["label"] in ORDER else len(ORDER))


if __name__ == "__main__":
    cli(__doc__, ORDER, table, "Rotations fused into the weights (SmolLM2-135M, pydoc-512)",
        "GPTQ with act-order, plain; with randomised Hadamard rotations (R1 + R2), GPTAQ, the clipping search or block "
        "reconstruction added alone; and all together.", __file__, "rotate",
        spec_of=spec_of)
