"""What MST-compression's regularizer buys, layer by layer, on SmolLM2-135M.

For every Linear of one decoder block: capture its inputs X on pydoc calibration windows, binarize it with
GPTQ-PB (10 % salient, Hessian salience; the pbllm-10 recipe's rounding), then train its latent weights
through the binary straight-through estimator of the distillation stage (compress.distill.BinaryGrid:
mu, alpha and the 8-bit salient grid fixed) on the layer's relative output error
‖X (Ŵ − W)ᵀ‖² / ‖X Wᵀ‖², plus `reg` times the MST regularizer (compress.mst.regularizer, per weight).
For each reg it reports the output error on held-out inputs, the sign rows' mean MST edge / K, the
additions the tree saves against the dense binary product, and MST bytes / plain sign bytes. reg = 0 is
the same training without the regularizer; "gptq-pb" is the starting point. Layer-level only: the
end-to-end version is distillation with `distill.mst_reg` (train=ste). Writes evals/results/mst_reg.{json,md}.

    python evals/mst_reg.py                 # block 0 and block 15, about 10 minutes on 2 cores
    python evals/mst_reg.py --blocks 3 --steps 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from compress import data, distill, models, mst
from compress.nn import CompressedLinear
from compress.plan import LayerSpec, LayerWeight
from compress.round import pbllm

REGS = (0.0, 0.1, 1.0, 10.0, 100.0)


def block_inputs(model: nn.Module, ids: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """Inputs [tokens, K] of every Linear of decoder block `block` on `ids`."""
    blk = models.blocks_of(model, models.arch_of(model))[block]
    seen: dict[str, torch.Tensor] = {}
    hooks = [lin.register_forward_hook(lambda _m, a, _o, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, lin in blk.named_modules() if isinstance(lin, nn.Linear)]
    with torch.no_grad():
        model(ids[:, :], use_cache=False)
    for h in hooks:
        h.remove()
    return {n: x.float() for n, x in seen.items()}


def tree_stats(S: torch.Tensor) -> dict[str, float]:
    st = mst.stats(mst.build(S))
    return {"mean_edge_over_K": st.mean_edge_over_K, "ops_saved": st.ops_saved, "mst_over_plain": st.mst_bytes /
            st.plain_bytes}


def rel_err(X: torch.Tensor, W_hat: torch.Tensor, W: torch.Tensor) -> float:
    return float(((X @ (W_hat - W).T) ** 2).sum() / ((X @ W.T) ** 2).sum())


def layer_rows(name: str, W: torch.Tensor, X: torch.Tensor, X_test: torch.Tensor, steps: int, lr: float
               ) -> list[dict]:
    H = 2 * X.T @ X / len(X)
    spec = LayerSpec(bits=1, group_size=-1, symmetric=False, binary=True, salient=0.1)
    lw = pbllm.apply(LayerWeight(W, spec), H, pbllm.Config(metric="hessian", feedback=True, signs="plain"))
    m = CompressedLinear.from_weight(lw, None)
    start = tree_stats(m.codes().bool())
    rows = [{"layer": name, "reg": "gptq-pb", "err": rel_err(X_test, m.dequantize(), W), **start}]
    for reg in REGS:
        bg = distill.binary_grid(m, 1.0)  # the tree of the starting signs, for every reg
        latent = nn.Parameter(m.dequantize())
        opt = torch.optim.Adam([latent], lr=lr * float(m.scale.float().mean()))
        for _ in range(steps):
            err = ((X @ (bg.forward(latent) - W).T) ** 2).sum() / ((X @ W.T) ** 2).sum()
            loss = err + reg * mst.regularizer(latent - bg.mu, bg.parent, bg.beta) / latent.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            W_hat = bg.forward(latent)
            signs = latent >= bg.mu
        rows.append({"layer": name, "reg": reg, "err": rel_err(X_test, W_hat, W), **tree_stats(signs)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| Linear | training | held-out output error | mean MST edge / K | ops saved | MST / plain bytes |",
             "|" + "---|" * 6]
    for r in rows:
        what = "GPTQ-PB (start)" if r["reg"] == "gptq-pb" else f"STE, reg {r['reg']}"
        lines.append(f"| {r['layer']} | {what} | {r['err']:.4f} | {r['mean_edge_over_K']:.3f} | {r['ops_saved']:.1%} | "
                     f"{r['mst_over_plain']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, nargs="*", default=[0, 15])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--windows", type=int, default=16, help="calibration windows of 256 tokens (half held out)")
    ap.add_argument("--lr", type=float, default=0.01, help="Adam step size in units of the layer's mean alpha")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mst_reg")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    saved = args.out.with_suffix(".json")
    if args.render:
        rows = json.loads(saved.read_text())
    else:
        torch.set_num_threads(2)
        torch.manual_seed(0)
        model, tok = models.load(models.resolve("smollm2-135m"))
        ids = data.calibration(tok, "pydoc", args.windows, 256).ids
        rows = []
        for b in args.blocks:
            xs = block_inputs(model, ids, b)
            blk = models.blocks_of(model, models.arch_of(model))[b]
            for n, lin in blk.named_modules():
                if isinstance(lin, nn.Linear):
                    X = xs[n]
                    half = len(X) // 2
                    rows += layer_rows(f"{b}.{n}", lin.weight.detach().float(), X[:half], X[half:], args.steps,
                                       args.lr)
                    print(table(rows[-1 - len(REGS):]).splitlines()[-1], flush=True)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(rows, indent=1))
    md = table(rows)
    print(md)
    cmd = f"python evals/mst_reg.py --blocks {' '.join(map(str, args.blocks))} --steps {args.steps} --lr {args.lr} " \
          f"--windows {args.windows}"
    args.out.with_suffix(".md").write_text(
        f"# MST regularizer, layer by layer (SmolLM2-135M)\n\nCommand: `{cmd}`. GPTQ-PB 10 % salient (Hessian) per "
        f"Linear, then {args.steps} Adam steps (lr {args.lr} x mean alpha) of the binary STE on the layer's relative "
        "output error + reg x the MST regularizer per weight (tree of the starting signs, beta = 3 / mean alpha). "
        "Error on held-out tokens of the same pydoc windows; ops saved = 1 − (K + Σ edges) / (R·K); bytes as stored "
        "(format.py).\n\n" + md + "\n")


if __name__ == "__main__":
    main()
