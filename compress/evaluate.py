"""Compare a compressed model with its original on identical token windows.

Perplexity is token-level over consecutive non-overlapping windows (the GPTQ-paper protocol): each
window is scored on its own, predicts its T-1 next tokens, and ppl = exp(total NLL / total predicted
tokens). Fidelity is measured per predicted token: KL(original ‖ compressed) of the next-token
distributions (natural log) and whether both models' top-1 tokens agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.nn import CompressedLinear

Progress = Callable[[int, int], None]


@dataclass
class ModelStats:
    """What one model scored on the windows, plus its size."""

    name: str
    ppl: float
    nll: float  # total over predicted tokens
    tokens: int
    seconds: float  # forward time over all windows
    bits_code: float | None = None  # average over the compressed Linears, codes only
    bits_total: float | None = None  # ... with scales and zeros
    disk_bytes: int | None = None
    kl_mean: float | None = None  # KL(original ‖ this) in nats per token
    kl_max: float | None = None  # worst single token
    top1: float | None = None  # fraction of tokens whose argmax agrees with the original's
    window_nll: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bits(model: nn.Module) -> tuple[float, float] | None:
    """(code bits, bits with scales/zeros) per weight over the model's CompressedLinears, by element count."""
    numel = code = total = 0.0
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            n = m.in_features * m.out_features
            c, t = m.spec.bits_per_weight(m.out_features, m.in_features)
            numel, code, total = numel + n, code + c * n, total + t * n
    return (code / numel, total / numel) if numel else None


def logprobs(model: nn.Module, ids: Tensor) -> Tensor:
    """log p(next token) at every position but the last of one window ids [T]: [T-1, V] fp32."""
    device = next(model.parameters()).device
    logits = model(input_ids=ids.unsqueeze(0).to(device), use_cache=False).logits[0]
    return F.log_softmax(logits[:-1].float(), dim=-1)


class _Tally:
    """Accumulates one model's NLL, and its KL / top-1 agreement against reference log-probs."""

    def __init__(self, name: str) -> None:
        self.name, self.nll, self.seconds = name, [], 0.0
        self.kl_sum, self.kl_max, self.agree, self.tokens = 0.0, 0.0, 0, 0

    def add(self, logp: Tensor, ids: Tensor, ref: Tensor | None) -> None:
        self.nll.append(float(-logp.gather(1, ids[1:].to(logp.device).unsqueeze(1)).sum()))
        self.tokens += logp.shape[0]
        if ref is not None:
            ref = ref.to(logp.device, torch.float32)
            kl = (ref.exp() * (ref - logp)).sum(-1)  # [T-1]
            self.kl_sum += float(kl.sum())
            self.kl_max = max(self.kl_max, float(kl.max()))
            self.agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())

    def stats(self, model: nn.Module, with_ref: bool) -> ModelStats:
        total = sum(self.nll)
        s = ModelStats(self.name, math.exp(total / self.tokens), total, self.tokens, self.seconds,
                       window_nll=self.nll)
        if with_ref:
            s.kl_mean, s.kl_max, s.top1 = self.kl_sum / self.tokens, self.kl_max, self.agree / self.tokens
        b = bits(model)
        if b is not None:
            s.bits_code, s.bits_total = b
        return s


def _timed_logprobs(model: nn.Module, ids: Tensor, tally: _Tally) -> Tensor:
    t0 = time.perf_counter()
    logp = logprobs(model, ids)
    tally.seconds += time.perf_counter() - t0
    return logp


@torch.no_grad()
def compare(models: dict[str, nn.Module], windows: Tensor, *, progress: Progress | None = None) -> list[ModelStats]:
    """Score every model on every window [n, T]; the first model is the reference for KL and top-1.

    Windows are processed one at a time by all models, so logits are never stored in bulk.
    """
    tallies = {k: _Tally(k) for k in models}
    for w, ids in enumerate(windows):
        ref = None
        for k, model in models.items():
            logp = _timed_logprobs(model, ids, tallies[k])
            tallies[k].add(logp, ids, ref)
            ref = logp if ref is None else ref
        if progress is not None:
            progress(w + 1, len(windows))
    return [tallies[k].stats(m, i > 0) for i, (k, m) in enumerate(models.items())]


@dataclass
class Reference:
    """The original model's log-probs on a few windows, kept (fp16, CPU) so that the model itself can
    be compressed in place and compared afterwards."""

    windows: Tensor
    logp: list[Tensor]
    stats: ModelStats


@torch.no_grad()
def reference(model: nn.Module, windows: Tensor, name: str = "original") -> Reference:
    tally, logps = _Tally(name), []
    for ids in windows:
        logp = _timed_logprobs(model, ids, tally)
        tally.add(logp, ids, None)
        logps.append(logp.to("cpu", torch.float16))
    return Reference(windows, logps, tally.stats(model, False))


@torch.no_grad()
def compare_to(ref: Reference, model: nn.Module, name: str = "compressed") -> ModelStats:
    tally = _Tally(name)
    for ids, r in zip(ref.windows, ref.logp, strict=True):
        tally.add(_timed_logprobs(model, ids, tally), ids, r)
    return tally.stats(model, True)


def perplexity(model: nn.Module, windows: Tensor) -> float:
    """Token-level perplexity of one model on windows [n, T]."""
    return compare({"model": model}, windows)[0].ppl
