"""The dense model's next-token distribution on calibration windows, and KL(dense ‖ candidate) against it.

Used wherever a search or an optimisation scores a candidate end to end (EvoPress fitness, DiscQuant's
distillation term). With `topk` > 0 only the dense top-K log-probs are kept, plus one bucket for the rest
of the mass, so the cache is [n, T-1, K] instead of [n, T-1, V]; the KL is then over K + 1 outcomes,
a lower bound of the full KL that is exact when the dense model puts all its mass in its top K.
At a `temperature` T ≠ 1 both distributions are softmax(logits / T) (Hinton's distillation; the caller
scales the KL by T²). `generate` samples the dense model's own text, for distillation on teacher data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from compress.util import atomic_write


@dataclass
class Teacher:
    """Dense next-token log-probs per calibration window: top-K values/indices ([n, T-1, K]) or full ([n, T-1, V])."""

    logp: Tensor  # fp16
    index: Tensor | None  # int32, None = full vocabulary
    temperature: float = 1.0

    def kl(self, logits: Tensor, windows: Tensor) -> Tensor:
        """Per-token KL(dense ‖ candidate) for candidate logits [B, T, V] of pool windows [B]: [B, T-1].
        Differentiable in `logits`."""
        q = F.log_softmax(logits[:, :-1].float() / self.temperature, dim=-1)
        p = self.logp[windows].float()
        if self.index is None:
            return (p.exp() * (p - q)).sum(-1)
        q_top = q.gather(-1, self.index[windows].long())
        pk, qk = p.exp(), q_top.exp()
        p_rest = (1 - pk.sum(-1)).clamp_min(1e-12)
        q_rest = (1 - qk.sum(-1)).clamp_min(1e-12)
        return (pk * (p - q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())

    def save(self, path: Path) -> None:
        tensors = {"logp": self.logp} | ({"index": self.index} if self.index is not None else {})
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"temperature": repr(self.temperature)}))

    @classmethod
    def load(cls, path: Path) -> Teacher:
        with safe_open(path, "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            temperature = float((f.metadata() or {}).get("temperature", "1.0"))
        return cls(t["logp"], t.get("index"), temperature)


@torch.no_grad()
def teacher(model: nn.Module, pool: Tensor, topk: int, batch_size: int, device: torch.device,
            temperature: float = 1.0) -> Teacher:
    """Run the (dense) model over the windows `pool` [n, T] once and keep its log-probs at `temperature`."""
    logps, idx = [], []
    for i in range(0, len(pool), batch_size):
        logits = model(input_ids=pool[i : i + batch_size].to(device), use_cache=False).logits[:, :-1]
        lp = F.log_softmax(logits.float() / temperature, dim=-1)
        if topk:
            v, ix = lp.topk(topk, dim=-1)
            logps.append(v.half().cpu())
            idx.append(ix.int().cpu())
        else:
            logps.append(lp.half().cpu())
    return Teacher(torch.cat(logps), torch.cat(idx) if topk else None, temperature)


def cached(path: Path | None, model: nn.Module, pool: Tensor, topk: int, batch_size: int,
           device: torch.device, temperature: float = 1.0) -> Teacher:
    """`teacher(...)`, read from / written to `path` when given (so an interrupted run does not redo it);
    a stored teacher of other windows, K or temperature is recomputed."""
    if path is not None and path.is_file():
        t = Teacher.load(path)
        k = 0 if t.index is None else t.index.shape[-1]
        if tuple(t.logp.shape[:2]) == (len(pool), pool.shape[1] - 1) and k == topk and t.temperature == temperature:
            return t
    t = teacher(model, pool, topk, batch_size, device, temperature)
    if path is not None:
        t.save(path)
    return t


@torch.no_grad()
def generate(model: nn.Module, prompts: Tensor, length: int, batch_size: int, device: torch.device,
             seed: int = 0, temperature: float = 1.0) -> Tensor:
    """Continue each prompt [n, P] to `length` tokens by sampling the model (KV cache, softmax at
    `temperature`, a seeded CPU generator, so the same call gives the same text): [n, length] int64."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = prompts[i : i + batch_size].to(device)
        step_in, cache = ids, None
        while ids.shape[1] < length:
            o = model(input_ids=step_in, past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            probs = F.softmax(o.logits[:, -1].float().cpu() / temperature, dim=-1)
            step_in = torch.multinomial(probs, 1, generator=gen).to(device)  # [b, 1]
            ids = torch.cat([ids, step_in], dim=1)
        out.append(ids.cpu())
    return torch.cat(out).long()
