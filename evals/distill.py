"""Distillation and pruning benchmark on SmolLM2-135M, pydoc-512 protocol (the trunk benchmark's evaluation).

Quantized rows: a GPTQ recipe, then the same recipe with the distillation stage (KL to the original on
the 128 x 512 calibration windows). Pruned rows (dense weights, 50 % unstructured per layer): magnitude
one-shot, Wanda one-shot (|w|·‖x‖ per row from one dense calibration pass; not sequential), magnitude +
the same distillation budget as ISS-P (mask frozen at once), Wanda + that budget (its mask frozen), ISS-P +
that budget. Every row runs in its own process. Writes evals/results/distill.{json,md}.

    python evals/distill.py                     # every row (hours on 2 CPU cores)
    python evals/distill.py --rows "gptq w3g128" "gptq w3g128 + distill scales"
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from common import EVAL_WINDOWS, SEQLEN, cli, fmt_num, fmt_ppl
from common import job as recipe_job

KD = ("distill={{steps: {steps}, windows_per_step: 4, batch_size: 2, lr: {lr}, warmup: {warmup}, train: {train}, "
      "topk: 256}}")
STEPS = 64
PRUNE_STEPS = 32  # the pruned rows train every weight: half the quantized rows' budget (one pass over the windows)
QUANT: dict[str, tuple[str, list[str]]] = {
    "gptq w3g128": ("gptq-3bit", []),
    "gptq w3g128 + distill scales": ("gptq-3bit", [KD.format(steps=STEPS, lr=1e-3, warmup=8, train="scales")]),
    "gptq w3g128 + distill norms": ("gptq-3bit", [KD.format(steps=STEPS, lr=1e-3, warmup=8, train="norms")]),
    "gptq w2g64": ("gptq-2bit", []),
    "gptq w2g64 + distill scales, 8 steps": ("gptq-2bit", [KD.format(steps=8, lr=1e-3, warmup=2, train="scales")]),
    "gptq w2g64 + distill scales": ("gptq-2bit", [KD.format(steps=STEPS, lr=1e-3, warmup=8, train="scales")]),
}
PRUNE: dict[str, dict] = {
    "magnitude 50% one-shot": {"mode": "magnitude"},
    "wanda 50% one-shot": {"mode": "wanda"},
    "magnitude 50% + distill": {"mode": "train", "prune_steps": 0},
    # Wanda's mask (per row), then the same training with that mask frozen (the pruned weights are the
    # smallest after one step, so the per-row magnitude mask taken then is Wanda's)
    "wanda 50% + distill": {"mode": "train", "prune_steps": 0, "wanda": True, "per_row": True},
    # ISS-P shrinks the pruned set by alpha per step: over a 16-step pruning phase 0.999 would leave it at
    # 98 % (magnitude pruning in all but name), so the short budget uses 0.9 (0.9^16 = 0.19).
    "iss-p 50% (alpha 0.9) + distill": {"mode": "train", "prune_steps": PRUNE_STEPS // 2, "iss_alpha": 0.9},
}
ROWS = [*QUANT, *PRUNE]


def one_shot(model: torch.nn.Module, linears: dict, calib: torch.Tensor, how: str) -> None:
    """Zero 50 % of every Linear: magnitude (one threshold per layer) or Wanda (|w|·‖x‖ per row)."""
    import torch

    from compress import prune

    norms = prune.input_norms(model, linears, calib) if how == "wanda" else {}
    with torch.no_grad():
        for n, lin in linears.items():
            lin.weight.mul_(prune.wanda(lin.weight, norms[n], 0.5) if norms else prune.magnitude(lin.weight, 0.5))


def prune_job(spec: dict) -> dict:
    import torch

    from compress import data, distill, evaluate, models, teacher
    from compress.util import peak_rss_mb

    torch.set_num_threads(2)
    ref = models.resolve("smollm2-135m")
    model, tok = models.load(ref)
    ev = data.evaluation(tok, "pydoc", SEQLEN, EVAL_WINDOWS)
    calib = data.calibration(tok, "pydoc", 128, SEQLEN).ids
    t0 = time.perf_counter()
    linears = {n: m for n, m in models.blocks_of(model, models.arch_of(model)).named_modules()
               if isinstance(m, torch.nn.Linear)}
    p = PRUNE[spec["label"]]
    out: dict = {"label": spec["label"]}
    if p["mode"] == "train":  # the teacher depends only on the model and the windows: cached across rows
        cache = Path(__file__).parent / ".cache" / "distill-teacher-pydoc-128x512-top256.safetensors"
        cache.parent.mkdir(parents=True, exist_ok=True)
        teach = teacher.cached(cache, model, calib, 256, 8, torch.device("cpu"))
        if p.get("wanda"):
            one_shot(model, linears, calib, "wanda")
        cfg = distill.Config(steps=PRUNE_STEPS, windows_per_step=4, batch_size=2, lr=1e-4, warmup=8, train="weights",
                             sparsity=0.5, prune_steps=p["prune_steps"], iss_alpha=p.get("iss_alpha", 0.999),
                             per_row=p.get("per_row", False))
        history = distill.distill(model, teach, calib, cfg)
        out["train_kl"] = [history[0], history[-1]]
    else:
        one_shot(model, linears, calib, p["mode"])
    out["compress_seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    out["sparsity"] = sum(int((m.weight == 0).sum()) for m in linears.values()) / sum(
        m.weight.numel() for m in linears.values())
    dense, _ = models.load(ref)
    d, c = evaluate.compare({"dense": dense, "pruned": model}, ev.ids)
    out.update(ppl=c.ppl, dense_ppl=d.ppl, kl=c.kl_mean, top1=c.top1)
    return out


def before_distillation(rows: list[dict]) -> list[dict]:
    """The GPTQ w2g64 checkpoint before distillation, from the eval report when this benchmark did not run it
    (same recipe, same calibration, same 40 x 512 pydoc windows: the same model and measurement)."""
    import json

    report = Path(__file__).parent / "results" / "report" / "eval-standard-pydoc-512x40.json"
    if not rows or any(r["label"] == "gptq w2g64" for r in rows) or not report.is_file():
        return rows
    m = next((m for m in json.loads(report.read_text())["models"] if m["name"] == "gptq-w2g64"), None)
    if m is None:
        return rows
    t = m["tasks"]["ppl-pydoc-512x40"]
    row = {"label": "gptq w2g64 (no distillation; evals/results/report)", "bits_code": m["bits"][0],
           "bits_total": m["bits"][1], "ppl": t["ppl"], "kl": t["kl_mean"], "top1": t["top1"], "report": True}
    return [rows[0], row, *rows[1:]]


def table(rows: list[dict]) -> str:
    lines = ["| model | bits or sparsity | ppl | KL / token | top-1 | training KL first → last | seconds | "
             "peak RSS MB |", "|" + "---|" * 8]
    for r in before_distillation(rows):
        if r["label"] == "dense":
            lines.append(f"| dense | 32 | {fmt_ppl(r['ppl'])} | - | - | - | - | - |")
            continue
        what = f"{r['sparsity']:.1%} zeros" if "sparsity" in r else f"{r['bits_code']:.2f} / {r['bits_total']:.2f}"
        kd = r.get("train_kl") or ([r["distilled"]["kl_first"], r["distilled"]["kl_last"]] if r.get("distilled")
                                   else None)
        lines.append(f"| {r['label']} | {what} | {fmt_ppl(r['ppl'])} | {fmt_num(r['kl'], '.4f')} | "
                     f"{fmt_num(r['top1'], '.2%')} | {'-' if not kd else f'{kd[0]:.4f} → {kd[1]:.4f}'} | "
                     + ("- | - |" if r.get("report") else f"{r['compress_seconds']:.0f} | {r['peak_rss_mb']:.0f} |"))
    return "\n".join(lines)


def main() -> None:
    cli(__doc__, ROWS, table, "Distillation and pruning benchmark: SmolLM2-135M, pydoc-512 protocol",
        f"Command: `python evals/distill.py`. Distillation: {STEPS} steps x 4 windows of 512 tokens from the "
        "128 calibration windows, top-256 teacher, AdamW with warm-up and cosine. Pruning: 50 % of every "
        f"Linear in the blocks; the pruned + distill rows train every weight for {PRUNE_STEPS} steps at lr 1e-4.",
        __file__, "distill",
        spec_of=lambda label: {"label": label, "recipe": QUANT[label][0], "edits": QUANT[label][1]}
        if label in QUANT else {"label": label},
        run=lambda spec: prune_job(spec) if spec["label"] in PRUNE else recipe_job(spec))

if __name__ == "__main__":
    main()
