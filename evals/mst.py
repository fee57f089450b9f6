"""MST compression of PB-LLM's binarized rows on SmolLM2-135M: per Linear kind, the mean MST edge (Hamming
distance between a row and its tree parent, over K), the additions saved against the dense binary product,
the tree depth (sequential steps) and the bytes of tree + differences against the plain sign bits. Every
tree is checked: the tree-order product equals the dense binary product exactly on integer activations.
Writes evals/results/mst.{json,md}.

    python evals/mst.py                    # compresses with pbllm-10, then analyses every Linear
    python evals/mst.py --recipe binary
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import compress
from compress import models, mst, recipe
from compress.nn import CompressedLinear


def analyse(model: torch.nn.Module) -> list[dict]:
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, CompressedLinear) or not m.spec.binary:
            continue
        S = m.codes().bool()  # the sign plane, however the checkpoint stores it
        tree = mst.build(S)
        x = torch.randint(-1000, 1000, (m.in_features, 2), dtype=torch.int64)
        exact = torch.equal(mst.matmul(tree, S, x), (S.long() * 2 - 1) @ x)
        st = mst.stats(tree)
        rows.append({"name": name, "kind": name.rsplit(".", 1)[-1], "rows": st.rows, "K": st.K,
                     "mean_edge_over_K": st.mean_edge_over_K, "ops_saved": st.ops_saved, "depth": st.depth,
                     "mst_bytes": st.mst_bytes, "ideal_bytes": st.ideal_bytes, "stored_as_mst": m.spec.signs == "mst",
                     "plain_bytes": st.plain_bytes, "exact": exact})
    return rows


def checkpoint_check(model: torch.nn.Module, tok: object, result: object) -> dict:
    """Save -> compress.load: logits on two pydoc windows equal the in-memory model's, and the compressed
    Linears' bytes in the file are the bits per weight the plan reports."""
    import tempfile

    from safetensors import safe_open

    from compress import checkpoint, data

    ids = data.evaluation(tok, "pydoc", 256, 2).ids
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(model, tok, result.plan, result.recipe, Path(d), card="mst benchmark")
        loaded = compress.load(d)
        with torch.no_grad():
            same = torch.equal(loaded(ids).logits, model(ids).logits)
        with safe_open(str(Path(d) / "model.safetensors"), "pt") as f:
            stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() * 8 for k in f.keys()  # noqa: SIM118
                         if any(k.startswith(n + ".") and not k.endswith(".bias") for n in result.plan))
        disk = checkpoint.disk_bytes(Path(d))
    _, total = result.avg_bits()
    weights = sum(a * b for a, b in result.shapes.values())
    return {"logits_equal": same, "stored_bits": stored, "reported_bits": total * weights, "bits_per_weight": total,
            "weights": weights, "disk_bytes": disk}


def table(rows: list[dict]) -> str:
    lines = ["| Linear | layers | R x K | mean edge / K | ops saved | depth (max) | MST bytes / plain (stored) | "
             "(ideal) | stored as MST | tree-order == dense |", "|" + "---|" * 10]
    kinds = sorted({r["kind"] for r in rows}, key=[r["kind"] for r in rows].index)
    for k in [*kinds, "all"]:
        rs = [r for r in rows if k in ("all", r["kind"])]
        mb, pb = sum(r["mst_bytes"] for r in rs), sum(r["plain_bytes"] for r in rs)
        ib = sum(r.get("ideal_bytes", r["mst_bytes"]) for r in rs)
        shape = f"{rs[0]['rows']} x {rs[0]['K']}" if k != "all" else "-"
        lines.append(
            f"| {k} | {len(rs)} | {shape} | {sum(r['mean_edge_over_K'] for r in rs) / len(rs):.3f} | "
            f"{sum(r['ops_saved'] for r in rs) / len(rs):.1%} | {max(r['depth'] for r in rs)} | "
            f"{mb / pb:.2f} | {ib / pb:.2f} | {sum(r.get('stored_as_mst', False) for r in rs)} | "
            f"{all(r['exact'] for r in rs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="pbllm-10")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mst")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    saved = args.out.with_suffix(".json")
    if args.render:
        out = json.loads(saved.read_text())
    else:
        torch.set_num_threads(2)
        model, tok = models.load(models.resolve("smollm2-135m"))
        result = compress.compress(model, tok, recipe.load(args.recipe))
        out = {"layers": analyse(model), "checkpoint": checkpoint_check(model, tok, result)}
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(out, indent=1))
    rows = out["layers"]
    md = table(rows)
    if ck := out.get("checkpoint"):
        md += (f"\n\nCheckpoint: save → `compress.load` → logits on 2 x 256 pydoc tokens equal the in-memory model: "
               f"**{ck['logits_equal']}**; the compressed Linears hold {ck['stored_bits'] / 8 / 2**20:.3f} MiB in the "
               f"file vs {ck['reported_bits'] / 8 / 2**20:.3f} MiB from the reported {ck['bits_per_weight']:.4f} bits "
               f"per weight x {ck['weights']:,} weights; whole checkpoint {ck['disk_bytes'] / 2**20:.1f} MiB on disk "
               "(dense embeddings, norms and the tied lm_head included).")
    print(md)
    args.out.with_suffix(".md").write_text(
        f"# MST compression of binarized SmolLM2-135M rows\n\nCommand: `python evals/mst.py --recipe {args.recipe}`. "
        "Rows = output channels of each binarized Linear (sign bits as stored, salient positions included); "
        "ops saved = 1 − (K + Σ edge distances) / (R·K); MST bytes as stored = an int16 parent and an int32 "
        "row offset per row + an int16 column per differing position (the root: its + columns); ideal = ⌈log2 R⌉-bit "
        "parents and ⌈log2 K⌉-bit columns; PB-LLM stores a layer's signs as its MST only when that is smaller."
        "\n\n" + md + "\n")


if __name__ == "__main__":
    main()
