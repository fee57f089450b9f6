"""The model card (README.md) written next to every checkpoint: only what was measured in this run."""

from __future__ import annotations

from typing import Any

from compress.evaluate import ModelStats, Reference
from compress.models import ModelRef
from compress.pipeline import Result


def summary(result: Result) -> dict[str, Any]:
    """Facts stored in config.json's quantization_config next to the plan."""
    code, total = result.avg_bits()
    return {"avg_bits_code": round(code, 4), "avg_bits_total": round(total, 4), "calibration": result.calibration,
            **({"stages": result.stages} if result.stages else {})}


def allocation_section(result: Result, kl_gain: float | None = None) -> list[str]:
    """What the allocator decided and how its loss model compared with the losses actually measured
    (`kl_gain` = the uniform reference's quick-check KL over the allocated model's, when measured)."""
    a = result.allocation
    if not a:
        return []
    code, total = result.avg_bits()
    out = ["", f"## Bit allocation ({a.get('method')})", "",
           f"Target {a.get('target_bits')} code bits per weight; realised {code:.4f} code bits "
           f"({total:.4f} with scales and zeros), averaged over the compressed Linears by element count."]
    if "realised_rate" in a:
        out.append(f"BAQ's idealised rate (mean log2 of the per-column level counts): {a['realised_rate']:.4f} bits; "
                   "the stored codes take ceil(log2 M) bits per column.")
    if "predicted_loss_ratio" in a and "pass1_loss" in a and result.total_loss:
        measured = result.total_loss / a["pass1_loss"]
        out.append(f"BAQ's layer-local loss model predicted the summed layer loss to change by a factor "
                   f"{a['predicted_loss_ratio']:.3f} against uniform {a.get('reference_bits')}-bit rounding; the "
                   f"rounding pass measured {measured:.3f} (its Hessians already see the mixed-precision prefix). "
                   "The model is layer-local; " + (
                       f"end to end, on the quick-check tokens, the allocated model's KL to the original is "
                       f"{1 / kl_gain:.3f} times the uniform reference's (prediction {a['predicted_loss_ratio']:.3f}"
                       f", off by {abs(1 / kl_gain - a['predicted_loss_ratio']):.3f})." if kl_gain else
                       "the end-to-end effect is what the quick check and `compress eval` measure."))
    if a.get("layer_gains"):
        g = sorted(a["layer_gains"].items(), key=lambda kv: kv[1])
        out += ["", "BAQ's predicted gain per Linear, geomean(L_j) / mean(L_j) of its column losses (lower = "
                "more to gain from unequal columns); the five largest predicted gains:", "",
                "| layer | predicted gain |", "|---|---|"]
        out += [f"| `{n}` | {v:.3f} |" for n, v in g[:5]]
        out.append(f"| median over {len(g)} Linears | {g[len(g) // 2][1]:.3f} |")
    if a.get("fitness_history"):
        h = a["fitness_history"]
        out.append(f"EvoPress: {a['generations']} generations ({a.get('search_seconds', 0):.0f} s), parent "
                   f"KL(dense ‖ candidate) on fresh calibration tokens {h[0]:.4f} → {h[-1]:.4f}; init {a.get('init')}.")
    return out


def model_card(ref: ModelRef, result: Result, quick: Reference | None, checked: ModelStats | None,
               uniform: ModelStats | None = None) -> str:
    """The checkpoint's README; `uniform` = the quick check of the allocation's uniform reference, if any."""
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
        f"| compressed Linears | {len(result.plan)} ({_dense_parts(result)}) |",
        f"| average bits per weight, codes only | {code:.3f} |",
        f"| average bits per weight, with scales and zeros | {total:.3f} |",
        f"| calibration | {result.calibration} |",
        f"| wall time / peak RSS | {result.seconds:.0f} s / {result.peak_rss_mb:.0f} MB |",
    ]
    binary = [s for s in result.plan.layers.values() if s.kind == "binary"]
    if binary:
        edges = [r.info["mst_edge"] for b in result.blocks for r in b.layers if "mst_edge" in r.info]
        mean = f"; mean MST edge {sum(edges) / len(edges):.1%} of K over the layers of this run" if edges else ""
        lines.append(f"| binary sign storage | {sum(s.signs == 'mst' for s in binary)} of {len(binary)} binary Linears "
                     f"as an MST over their rows (only where smaller), the rest as plain 1-bit planes{mean} |")
    kd = result.distilled
    if kd:
        plain = kd.get("temperature", 1.0) == 1.0 and not kd.get("hidden_mse")
        what = ("KL(original‖model)" if plain else
                f"loss (T² KL at T = {kd['temperature']} + {kd['hidden_mse']} × hidden-state NMSE)")
        lines.append(f"| distillation ({kd['train']}) | {kd['steps']} steps x {kd['windows_per_step']} windows = "
                     f"{kd['tokens']} tokens of {kd.get('data', 'calibration')} text, {kd['seconds']:.0f} s; "
                     f"{what} on the training windows {kd['kl_first']:.4f} → {kd['kl_last']:.4f} |")
    r = result.rounding
    if r:  # a joint rounding has no layer losses: report its optimisation instead
        kl = r.get("train_kl") or [float("nan")]
        lines.append(f"| {r['method']} | {r['steps']} steps x {r['windows_per_step']} windows = {r['tokens']} "
                     f"tokens, {r['seconds']:.0f} s; training KL(original‖W_x) {kl[0]:.4f} → {kl[-1]:.4f}; "
                     f"{r['fractional_before_rounding']:.2%} of the variables still fractional before rounding |")
    else:
        lines.append(f"| sum of layer losses ({rec.round.method}) | {result.total_loss:.4g}"
                     + (f" (over the blocks of the last run; {result.resumed} were resumed from an interrupted "
                        "run)" if result.resumed else "") + " |")
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
            *([f"| uniform {result.allocation.get('reference_bits')}-bit (the allocation's reference) | "
               f"{uniform.ppl:.3f} | {uniform.kl_mean:.4f} | {uniform.top1:.2%} |"] if uniform is not None else []),
            "",
            "Run `compress eval ORIGINAL THIS_DIR` for the full comparison.",
        ]
    lines += allocation_section(result, uniform.kl_mean / checked.kl_mean if uniform and checked and checked.kl_mean
                                else None)
    fresh = [b for b in result.blocks if not b.resumed]
    if fresh and not result.rounding:
        worst = sorted((r for b in fresh for r in b.layers), key=lambda r: -r.loss)[:5]
        lines += ["", "Largest layer losses (the method's own estimate of ½·tr(ΔW H ΔWᵀ)):", "",
                  "| layer | loss |", "|---|---|"]
        lines += [f"| `{r.name}` | {r.loss:.4g} |" for r in worst]
    return "\n".join(lines) + "\n"


def _dense_parts(result: Result) -> str:
    """What stays dense, with the output head's story: rounded (weights.lm_head), or untied by the rotation."""
    if result.plan.head is not None:
        return f"{result.plan.head} rounded too; embeddings and norms stay dense"
    untied = result.rotation.get("untied_lm_head_params")
    if untied:
        return (f"embeddings, norms and lm_head stay dense; the rotation untied lm_head from the embedding: "
                f"+{untied / 1e6:.1f}M dense parameters, which weights.lm_head=true would round")
    return "embeddings, lm_head and norms stay dense"
