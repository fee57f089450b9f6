"""Run by tests/allocate/test_evopress.py under `torchrun --nproc_per_node N`: an EvoPress search on a tiny llama
with its database in argv[2]; rank 0 writes the chosen widths and the fitness history as JSON to argv[1]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import EVO, SMALL, tiny_llama

import compress
from compress import parallel, recipe


def main() -> None:
    torch.set_num_threads(1)
    rec = recipe.load("gptq-3bit", [*SMALL, "calibrate.samples=16", EVO, f"allocate.database={sys.argv[2]}"])
    res = compress.compress(tiny_llama(), None, rec)
    if parallel.is_main():
        widths = {n: s.bits for n, s in res.plan.layers.items()}
        Path(sys.argv[1]).write_text(json.dumps({"widths": widths,
                                                 "fitness": res.allocation["fitness_history"]}))


if __name__ == "__main__":
    main()
