"""The dense model's next-token distribution on calibration windows, and KL(dense ‖ candidate) against it.

Used wherever a search or an optimisation scores a candidate end to end (EvoPress fitness, DiscQuant's
distillation term). With `topk` > 0 only the dense top-K log-probs are kept, plus one bucket for the rest
of the mass, so the cache is [n, T-1, K] instead of [n, T-1, V]; the KL is then over K + 1 outcomes,
a lower bound of the full KL that is exact when the dense model puts all its mass in its top K.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


@dataclass
class Teacher:
    """Dense next-token log-probs per calibration window: top-K values/indices ([n, T-1, K]) or full ([n, T-1, V])."""

    logp: Tensor  # fp16
    index: Tensor | None  # int32, None = full vocabulary

    def kl(self, logits: Tensor, windows: Tensor) -> Tensor:
        """Per-token KL(dense ‖ candidate) for candidate logits [B, T, V] of pool windows [B]: [B, T-1].
        Differentiable in `logits`."""
        q = F.log_softmax(logits[:, :-1].float(), dim=-1)
        p = self.logp[windows].float()
        if self.index is None:
            return (p.exp() * (p - q)).sum(-1)
        q_top = q.gather(-1, self.index[windows].long())
        pk, qk = p.exp(), q_top.exp()
        p_rest = (1 - pk.sum(-1)).clamp_min(1e-12)
        q_rest = (1 - qk.sum(-1)).clamp_min(1e-12)
        return (pk * (p - q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        save_file({"logp": self.logp} | ({"index": self.index} if self.index is not None else {}), tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Teacher:
        t = load_file(path)
        return cls(t["logp"], t.get("index"))


@torch.no_grad()
def teacher(model: nn.Module, pool: Tensor, topk: int, batch_size: int, device: torch.device) -> Teacher:
    """Run the (dense) model over the windows `pool` [n, T] once and keep its log-probs."""
    logps, idx = [], []
    for i in range(0, len(pool), batch_size):
        logits = model(input_ids=pool[i : i + batch_size].to(device), use_cache=False).logits[:, :-1]
        lp = F.log_softmax(logits.float(), dim=-1)
        if topk:
            v, ix = lp.topk(topk, dim=-1)
            logps.append(v.half().cpu())
            idx.append(ix.int().cpu())
        else:
            logps.append(lp.half().cpu())
    return Teacher(torch.cat(logps), torch.cat(idx) if topk else None)


def cached(path: Path | None, model: nn.Module, pool: Tensor, topk: int, batch_size: int,
           device: torch.device) -> Teacher:
    """`teacher(...)`, read from / written to `path` when given (so an interrupted run does not redo it)."""
    if path is not None and path.is_file():
        return Teacher.load(path)
    t = teacher(model, pool, topk, batch_size, device)
    if path is not None:
        t.save(path)
    return t
