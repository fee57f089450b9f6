"""Shared by the benchmark scripts: one compression per fresh process, scored on the pydoc-512 protocol.

A job is {"label", "recipe", "edits"} (or {"label": "dense"}); it loads SmolLM2, compresses it with the
recipe, records wall time and peak RSS of the compression, then loads the dense model and compares both
on 40 x 512 pydoc windows from token 0 (ppl, KL, top-1). Rows are merged into a JSON file by label, so a
partial re-run keeps the other rows.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compress.pipeline import Result

EVAL_WINDOWS, SEQLEN = 40, 512


def job(spec: dict) -> dict:
    import torch

    import compress
    from compress import data, evaluate, models, recipe
    from compress.util import peak_rss_mb

    torch.set_num_threads(2)
    ref = models.resolve("smollm2-135m")
    model, tok = models.load(ref)
    ev = data.evaluation(tok, "pydoc", SEQLEN, EVAL_WINDOWS)
    out = {"label": spec["label"]}
    if spec["label"] == "dense":
        t0 = time.perf_counter()
        out.update(ppl=evaluate.compare({"dense": model}, ev.ids)[0].ppl, eval_seconds=time.perf_counter() - t0)
        return out
    rec = recipe.load(spec["recipe"], spec.get("edits", []))
    t0 = time.perf_counter()
    result = compress.compress(model, tok, rec)
    out["compress_seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    out["layer_loss"] = result.total_loss
    out["bits_code"], out["bits_total"] = result.avg_bits()
    out["allocation"] = result.allocation
    out["rounding"] = result.rounding
    out["distilled"] = result.distilled
    out["widths"] = _width_histogram(result)
    out["rotation"] = result.rotation
    out["linear_params"] = sum(N * K for N, K in result.shapes.values())  # (the output head's too when it is planned)
    out["head_planned"] = result.plan.head is not None
    out["stages"] = result.stages  # each stage's wall seconds and the peak RSS at its end
    out["blocks"] = [{"index": b.index, "stage": b.stage, "loss": b.loss, **b.info} for b in result.blocks]  # per block
    if spec.get("save"):  # bytes on disk of the packed checkpoint (weights files only)
        import tempfile

        from compress import checkpoint

        with tempfile.TemporaryDirectory() as d:
            checkpoint.save(model, tok, result.plan, result.recipe, Path(d), card="benchmark")
            out["disk_mb"] = checkpoint.disk_bytes(Path(d)) / 2**20
    dense, _ = models.load(ref)  # after compressing, so the peak RSS above is the compression's own
    t0 = time.perf_counter()
    d, c = evaluate.compare({"dense": dense, "compressed": model}, ev.ids)
    out.update(ppl=c.ppl, dense_ppl=d.ppl, kl=c.kl_mean, top1=c.top1, eval_seconds=time.perf_counter() - t0)
    return out


def _width_histogram(result: Result) -> dict[str, float]:
    """Share of compressed weights at each width."""
    counts: dict[int, float] = {}
    for name, spec in result.plan.layers.items():
        N, K = result.shapes[name]
        for w in spec.column_bits(K).tolist():
            counts[w] = counts.get(w, 0.0) + N
    total = sum(counts.values())
    return {str(w): c / total for w, c in sorted(counts.items())}


def grid_spec(label: str, methods: dict[str, tuple[str, list[str]]],
              settings: dict[str, tuple[int, int]]) -> dict:
    """The job of a "METHOD SETTING" row of a methods x settings grid: the method's recipe and edits, then the
    setting's width and group size ("dense" is the dense row)."""
    if label == "dense":
        return {"label": label}
    method, setting = label.split(" ")
    name, edits = methods[method]
    bits, group = settings[setting]
    return {"label": label, "recipe": name, "edits": [*edits, f"weights.bits={bits}", f"weights.group_size={group}"]}


def run_job(spec: dict, script: str) -> dict:
    p = subprocess.run([sys.executable, script, "--job", json.dumps(spec)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"job {spec} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def merge(path: Path, new: dict, order: list[str]) -> list[dict]:
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if r["label"] != new["label"]] + [new]
    rows.sort(key=lambda r: order.index(r["label"]) if r["label"] in order else len(order))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return rows


def fmt_ppl(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 1e4 else f"{x:.3g}")


def fmt_num(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def run_rows(labels: list[str], spec_of: Callable[[str], dict], saved: Path, order: list[str],
             script: str) -> list[dict]:
    """Run the jobs of `labels` one after another (dense first), merging each row into `saved` as it lands."""
    rows = json.loads(saved.read_text()) if saved.is_file() else []
    for label in ["dense", *[x for x in labels if x != "dense"]]:
        t0 = time.perf_counter()
        new = run_job({"label": "dense"} if label == "dense" else spec_of(label), script)
        print(f"{label} done in {time.perf_counter() - t0:.0f}s: ppl {fmt_ppl(new['ppl'])}", flush=True)
        rows = merge(saved, new, order)
    return rows


def report(out: Path, title: str, intro: str, md: str) -> None:
    print(md)
    out.with_suffix(".md").write_text(f"# {title}\n\n{intro}\n\n{md}\n")


def cli(doc: str, rows: dict[str, tuple[str, list[str]]] | list[str], table: Callable[[list[dict]], str], title: str,
        intro: str, script: str, name: str, spec_of: Callable[[str], dict] | None = None,
        run: Callable[[dict], dict] | None = None, **spec: object) -> None:
    """The command line of a benchmark: `--rows` to run some rows (the others are kept), `--render` to
    re-render the saved table. Rows are {label: (recipe, edits)} (extra job fields in `spec`), or labels
    with `spec_of(label) -> job spec`; `run(spec) -> row` replaces the recipe job for custom rows."""
    import argparse

    labels = list(rows)
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--rows", nargs="*", choices=labels, default=labels)
    ap.add_argument("--out", type=Path, default=Path(script).parent / "results" / name)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    if args.job:
        print(json.dumps((run or job)(json.loads(args.job))))
        return
    if spec_of is None:
        assert isinstance(rows, dict)
        spec_of = lambda label: {"label": label, "recipe": rows[label][0], "edits": rows[label][1], **spec}  # noqa: E731
    saved = args.out.with_suffix(".json")
    done = json.loads(saved.read_text()) if saved.is_file() else []
    if not args.render:
        done = run_rows(args.rows, spec_of, saved, ["dense", *labels], script)
    report(args.out, title, intro, table(done))
