"""Trunk benchmark: SmolLM2-135M on the pydoc-512 protocol (../shared/protocol.md).

Dense perplexity, then RTN / GPTQ / GPTQ+act-order at w4 g128, w3 g128, w2 g64 (asymmetric, fp16 scales),
each compression in its own process so that its wall time and peak RSS are its own. Evaluation: 40
windows x 512 tokens from the start of the pydoc topics (sorted keys); calibration: 128 x 512 from
token 30720 on (windows 60..187, disjoint). Prints a table and writes evals/results/trunk.{json,md}.

    python evals/trunk.py                     # everything (about an hour and a half on 2 CPU cores)
    python evals/trunk.py --only w4g128       # one setting
    python evals/trunk.py --methods rtn gptq  # skip act-order
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"w4g128": (4, 128), "w3g128": (3, 128), "w2g64": (2, 64)}
METHODS = {
    "rtn": ("rtn-4bit", []),
    "gptq": ("gptq-4bit", ["round.act_order=false"]),
    "gptq+act-order": ("gptq-4bit", ["round.act_order=true"]),
}
REFERENCE = {  # ../shared/protocol.md: our RTN figures and IST-DASLab/gptq under the same protocol
    ("dense", ""): 14.007, ("rtn", "w4g128"): 18.736, ("rtn", "w3g128"): 81.727, ("rtn", "w2g64"): 4.4e5,
    ("gptq", "w4g128"): 18.09, ("gptq", "w3g128"): 32.07, ("gptq", "w2g64"): 2555,
}
EVAL_WINDOWS, SEQLEN = 40, 512


def job(spec: dict) -> dict:
    """Run in a fresh process: load SmolLM2, compress (unless dense), evaluate against the dense model."""
    import resource

    import torch

    import compress
    from compress import data, evaluate, models, recipe

    torch.set_num_threads(2)
    ref = models.resolve("smollm2-135m")
    model, tok = models.load(ref)
    ev = data.evaluation(tok, "pydoc", SEQLEN, EVAL_WINDOWS)
    out = {"method": spec["method"], "setting": spec.get("setting", "")}
    if spec["method"] == "dense":
        t0 = time.perf_counter()
        s = evaluate.compare({"dense": model}, ev.ids)[0]
        out.update(ppl=s.ppl, eval_seconds=time.perf_counter() - t0)
        return out
    name, edits = METHODS[spec["method"]]
    bits, group = SETTINGS[spec["setting"]]
    rec = recipe.load(name, [*edits, f"weights.bits={bits}", f"weights.group_size={group}"])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    result = compress.compress(model, tok, rec)
    out["compress_seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_before_mb"] = rss0
    out["layer_loss"] = result.total_loss
    out["bits_code"], out["bits_total"] = result.avg_bits()
    dense, _ = models.load(ref)  # loaded after compressing, so the peak RSS above is the compression's own
    t0 = time.perf_counter()
    d, c = evaluate.compare({"dense": dense, "compressed": model}, ev.ids)
    out.update(ppl=c.ppl, dense_ppl=d.ppl, kl=c.kl_mean, top1=c.top1, eval_seconds=time.perf_counter() - t0)
    return out


def run_job(spec: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"job {spec} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt_ppl(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 1e4 else f"{x:.3g}")


def fmt_loss(x: float) -> str:
    return "-" if x != x else f"{x:.4g}"  # nan: the method computes no loss (RTN)


def table(rows: list[dict]) -> str:
    head = ("| setting | method | ppl | reference ppl | KL / token | top-1 | bits (codes / +meta) | "
            "layer loss | compress s | peak RSS MB |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        refppl = REFERENCE.get((r["method"], r["setting"]))
        bits = f"{r['bits_code']:.2f} / {r['bits_total']:.3f}" if "bits_code" in r else "32 (fp32)"
        lines.append(
            f"| {r['setting'] or '-'} | {r['method']} | {fmt_ppl(r['ppl'])} | {fmt_ppl(refppl)} | "
            f"{r['kl']:.4f} | {r['top1']:.2%} | {bits} | {fmt_loss(r['layer_loss'])} | {r['compress_seconds']:.0f} | "
            f"{r['peak_rss_mb']:.0f} |" if "kl" in r else
            f"| - | dense | {fmt_ppl(r['ppl'])} | {fmt_ppl(refppl)} | - | - | {bits} | - | - | - |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trunk")
    ap.add_argument("--render", action="store_true", help="re-render the table from the saved JSON, run nothing")
    args = ap.parse_args()
    if args.job:
        print(json.dumps(job(json.loads(args.job))))
        return
    saved = args.out.with_suffix(".json")
    rows = json.loads(saved.read_text()) if saved.is_file() else []
    if not args.render:  # run the asked-for rows; rows of earlier runs that were not asked for are kept
        specs = [{"method": "dense"}] + [{"method": m, "setting": s} for s in args.only for m in args.methods]
        for spec in specs:
            t0 = time.perf_counter()
            new = run_job(spec)
            print(f"{spec} done in {time.perf_counter() - t0:.0f}s: ppl {fmt_ppl(new['ppl'])}", flush=True)
            rows = [r for r in rows if (r["method"], r["setting"]) != (new["method"], new["setting"])] + [new]
        order = {(m, s): i for i, (m, s) in enumerate([("dense", "")] + [(m, s) for s in SETTINGS for m in METHODS])}
        rows.sort(key=lambda r: order[(r["method"], r["setting"])])
    md = table(rows)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text(
        "# Trunk benchmark: SmolLM2-135M, pydoc-512 protocol\n\n"
        "Command: `python evals/trunk.py`. Evaluation 40 x 512 tokens from the start of the pydoc topics; "
        "calibration 128 x 512 (windows 60..187). Asymmetric grids, fp16 scales, groups along in_features. "
        "Reference ppl: ../shared/protocol.md (RTN: ours with fp32 scales; GPTQ: IST-DASLab/gptq, act-order off). "
        "Peak RSS is the compressing process's (model load + compression), measured before the dense copy "
        "for KL is loaded.\n\n" + md + "\n")


if __name__ == "__main__":
    main()
