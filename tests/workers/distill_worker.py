"""Run by tests/test_distill.py under `torchrun --nproc_per_node N`: distil a tiny RTN-2bit llama and write
rank 0's loss history as JSON to argv[1]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import tiny_llama

import compress
from compress import distill, parallel, recipe, teacher


def main() -> None:
    torch.set_num_threads(1)
    windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    dense = tiny_llama()
    teach = teacher.teacher(dense, windows, 16, 4, torch.device("cpu"))
    m = tiny_llama()
    compress.compress(m, None, recipe.load("rtn-4bit", ["weights.bits=2", "weights.group_size=32"]))
    cfg = distill.Config(steps=6, windows_per_step=4, batch_size=1, lr=5e-3, warmup=2, topk=16)
    history = distill.distill(m, teach, windows, cfg)
    if parallel.is_main():
        Path(sys.argv[1]).write_text(json.dumps(history))


if __name__ == "__main__":
    main()
