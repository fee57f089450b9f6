"""The model card (README.md) written next to every checkpoint: only what was measured in this run."""

from __future__ import annotations

from typing import Any

from compress.evaluate import ModelStats, Reference
from compress.models import ModelRef
from compress.pipeline import Result


def summary(result: Result) -> dict[str, Any]:
    """Facts stored in config.json's quantization_config next to the plan."""
    code, total = result.avg_bits()
    return {"avg_bits_code": round(code, 4), "avg_bits_total": round(total, 4), "calibration": result.calibration}


def model_card(ref: ModelRef, result: Result, quick: Reference | None, checked: ModelStats | None) -> str:
    rec = result.recipe
    code, total = result.avg_bits()
    lines = [
        f"# {ref.display} · {rec.name}",
        "",
        f"Compressed with `compress` recipe `{rec.name}`: {rec.description}",
        "",
        "```python",
        "import compress  # registers the 'compress' quantization method with transformers",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained('<this directory>')",
        "```",
        "",
        "## What was measured in this run",
        "",
        "| | |",
        "|---|---|",
        f"| source model | `{ref.source}`{' / ' + ref.gguf_file if ref.gguf_file else ''} |",
        f"| compressed Linears | {len(result.plan)} (embeddings, lm_head and norms stay dense) |",
        f"| average bits per weight, codes only | {code:.3f} |",
        f"| average bits per weight, with scales and zeros | {total:.3f} |",
        f"| calibration | {result.calibration} |",
        f"| wall time / peak RSS | {result.seconds:.0f} s / {result.peak_rss_mb:.0f} MB |",
        f"| sum of layer losses ({rec.round.method}) | {result.total_loss:.4g}"
        + (f" (over the blocks of the last run; {result.resumed} were resumed from an interrupted run)"
           if result.resumed else "") + " |",
    ]
    if quick is not None and checked is not None:
        lines += [
            "",
            f"Quick check on {quick.stats.tokens} held-out tokens of the offline pydoc corpus (token-level "
            "perplexity, windows disjoint from the calibration windows):",
            "",
            "| model | ppl | KL(original‖compressed) / token | top-1 agreement |",
            "|---|---|---|---|",
            f"| original | {quick.stats.ppl:.3f} | - | - |",
            f"| compressed | {checked.ppl:.3f} | {checked.kl_mean:.4f} | {checked.top1:.2%} |",
            "",
            "Run `compress eval ORIGINAL THIS_DIR` for the full comparison.",
        ]
    fresh = [b for b in result.blocks if not b.resumed]
    if fresh:
        worst = sorted((r for b in fresh for r in b.layers), key=lambda r: -r.loss)[:5]
        lines += ["", "Largest layer losses (the method's own estimate of ½·tr(ΔW H ΔWᵀ)):", "",
                  "| layer | loss |", "|---|---|"]
        lines += [f"| `{r.name}` | {r.loss:.4g} |" for r in worst]
    return "\n".join(lines) + "\n"
