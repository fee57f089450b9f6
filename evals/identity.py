"""Identity check for refactors: compress a fixed set of (model, recipe) jobs and record a SHA-256 per
checkpoint tensor, or compare the tensors with a record made earlier (e.g. before a structural change).

    python evals/identity.py --write before.json            # tiny-model jobs (every recipe), about 2 min
    python evals/identity.py --write before.json --smollm2  # + the trunk GPTQ settings on SmolLM2
    python evals/identity.py --check before.json [--smollm2]  # prints one row per job: same / differs (which)

The tiny jobs cover every recipe in recipes/ on a random 2-block Llama with random calibration tokens; the
SmolLM2 jobs are evals/trunk.py's GPTQ rows (w4g128, w3g128, w2g64, act-order off and on) and the
integration test's gptq-4bit/rtn-4bit, on fewer calibration windows (32) to keep the check short: the code
paths are the same as the trunk's 128.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

TINY = ["calibrate.dataset=random", "calibrate.samples=8", "calibrate.seqlen=32", "calibrate.batch_size=4",
        "weights.group_size=32"]
TINY_RECIPE = {  # per recipe: what shortens it on the tiny model (same code paths)
    "evopress": ["allocate.generations=2", "allocate.offspring=2", "allocate.stages=[[1, 32]]", "allocate.topk=16",
                 "calibrate.samples=8"],
    "discquant": ["round.steps=6", "round.windows_per_step=2", "round.warmup=2", "round.save_every=3",
                  "round.log_every=3", "weights.group_size=16"],
    "iss-p": ["distill.steps=6", "distill.windows_per_step=2", "distill.batch_size=2", "distill.prune_steps=3",
              "distill.topk=0", "weights.group_size=32"],
    "baq-3bit-faithful": ["weights.group_size=-1"],
}
SMOLLM2 = {f"smollm2 gptq{' act' if act else ''} w{b}g{g}": ("gptq-4bit", [f"weights.bits={b}",
           f"weights.group_size={g}", f"round.act_order={str(act).lower()}", "calibrate.samples=32"])
           for b, g in ((4, 128), (3, 128), (2, 64)) for act in (False, True)}
SMOLLM2 |= {"smollm2 integration gptq-4bit": ("gptq-4bit", ["calibrate.samples=16"]),
            "smollm2 integration rtn-4bit": ("rtn-4bit", [])}


def tiny_jobs() -> dict[str, tuple[str, list[str]]]:
    recipes = sorted(p.stem for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    jobs = {}
    for name in recipes:
        extra = [e for key, edits in TINY_RECIPE.items() if key in name for e in edits]
        jobs[f"tiny {name}"] = (name, [*TINY, *extra])
    return jobs


def digests(model, plan, rec) -> dict[str, str]:
    from safetensors.torch import load_file

    from compress import checkpoint

    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(model, None, plan, rec, Path(d), card="identity")
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            for k, t in load_file(f).items():
                out[k] = f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha256(t.contiguous().view(-1).view(
                    __import__("torch").uint8).numpy().tobytes()).hexdigest()[:16]
        return out


def run(jobs: dict[str, tuple[str, list[str]]], write: Path | None = None) -> dict[str, dict[str, str]]:
    import torch

    import compress
    from compress import models, recipe

    torch.set_num_threads(2)
    out = {}
    for label, (name, edits) in jobs.items():
        t0 = time.perf_counter()
        if label.startswith("tiny"):
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(
                hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=384, max_position_embeddings=256, tie_word_embeddings=True)).eval()
            tok = None
        else:
            model, tok = models.load(models.resolve("smollm2-135m"))
        torch.manual_seed(0)
        res = compress.compress(model, tok, recipe.load(name, edits))
        out[label] = digests(model, res.plan, res.recipe)
        print(f"{label}: {len(out[label])} tensors, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if write is not None:  # after every job, so a long run leaves what it finished
            old = json.loads(write.read_text()) if write.is_file() else {}
            write.write_text(json.dumps(old | {label: out[label]}, indent=1, sort_keys=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", type=Path)
    ap.add_argument("--check", type=Path)
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--only", nargs="*", help="job labels (substring match)")
    a = ap.parse_args()
    jobs = tiny_jobs() | (SMOLLM2 if a.smollm2 else {})
    if a.only:
        jobs = {k: v for k, v in jobs.items() if any(s in k for s in a.only)}
    got = run(jobs, a.write)
    if a.check:
        ref = json.loads(a.check.read_text())
        print("| job | tensors | verdict |\n|---|---|---|")
        for label, d in got.items():
            r = ref.get(label)
            if r is None:
                print(f"| {label} | {len(d)} | no record |")
                continue
            bad = sorted(k for k in set(r) | set(d) if r.get(k) != d.get(k))
            print(f"| {label} | {len(d)} | {'bit-identical' if not bad else 'DIFFERS: ' + ', '.join(bad[:4])} |")


if __name__ == "__main__":
    main()
