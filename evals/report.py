"""The eval-suite report on SmolLM2-135M, made the way a user makes it: checkpoints written by the `compress`
command, then one `compress eval` over all of them (suite standard: pydoc-512 token perplexity, KL and top-1
agreement against the original, the offline multiple-choice task with its standard error), offline.

Checkpoints go to evals/.cache/report/<name> (made once); the report (JSON, Markdown, PNG of quality vs
bits) and the printed table go to evals/results/report/. Eval results are cached per (model fingerprint,
task) under evals/.cache/eval, so a re-run only scores what changed.

    python evals/report.py                 # RTN w4, GPTQ w4 / w3 / w2 (tens of minutes on 2 cores)
    python evals/report.py --bnb nf4 --bnb int8   # + bitsandbytes references (slow on a CPU: NF4 dequantizes per call)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
CACHE = HERE / ".cache"
CHECKPOINTS: dict[str, tuple[str, list[str]]] = {  # name -> (recipe, --set edits)
    "rtn-w4g128": ("rtn-4bit", []),
    "gptq-w4g128": ("gptq-4bit", []),
    "gptq-w3g128": ("gptq-3bit", []),
    "gptq-w2g64": ("gptq-2bit", []),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(CHECKPOINTS), default=list(CHECKPOINTS))
    ap.add_argument("--bnb", action="append", default=[], help="bitsandbytes reference: nf4 | fp4 | int8")
    ap.add_argument("--suite", default="standard")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "report")
    args = ap.parse_args()
    env = dict(os.environ, COMPRESS_CACHE=str(CACHE))
    cli = [sys.executable, "-m", "compress.cli"]
    dirs = []
    for name in args.only:
        recipe, edits = CHECKPOINTS[name]
        d = CACHE / "report" / name
        if not (d / "config.json").is_file():
            print(f"compressing {name} ({recipe})", flush=True)
            subprocess.run([*cli, "smollm2-135m", "--recipe", recipe, "--out", str(d), "--eval-windows", "0",
                            *[a for e in edits for a in ("--set", e)]], check=True, env=env)
        dirs.append(str(d))
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = [*cli, "eval", "smollm2-135m", *dirs, "--suite", args.suite, "--out", str(args.out),
           *[a for k in args.bnb for a in ("--bnb", k)]]
    print("$ compress eval smollm2-135m " + " ".join(Path(d).name for d in dirs) + f" --suite {args.suite}"
          + "".join(f" --bnb {k}" for k in args.bnb), flush=True)
    p = subprocess.run(cmd, env=dict(env, COLUMNS="200"), capture_output=True, text=True)
    sys.stdout.write(p.stdout)
    if p.returncode != 0:
        raise SystemExit(f"compress eval failed:\n{p.stderr[-3000:]}")
    (args.out / "table.txt").write_text(p.stdout)


if __name__ == "__main__":
    main()
