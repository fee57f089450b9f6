"""An offline multiple-choice task: pick a passage's true continuation among continuations from elsewhere.

`pydoc_mc` needs no network: items come from the evaluation region of the pydoc corpus (tokens before
`data.PYDOC_CALIB_START`, so never from calibration text). Item i takes a random passage of `context`
tokens; its true continuation is the `continuation` tokens that follow; the distractors are spans of the
same length starting elsewhere in the region (at least one passage away). The true choice sits at a
random position among the `choices`. A model answers with the choice of highest total log-probability
given the context (all choices have the same length, so total and mean agree). Accuracy carries its
binomial standard error sqrt(acc (1 - acc) / n). Everything is seeded: every model sees the same items.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress import data


@dataclass(frozen=True)
class Item:
    context: Tensor  # int64 [C]
    choices: Tensor  # int64 [k, L]
    answer: int


@dataclass
class MCResult:
    accuracy: float
    stderr: float
    n: int
    seconds: float
    margins: list[float] = field(default_factory=list)  # true choice's log-prob minus the best distractor's

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "stderr": self.stderr, "n": self.n, "seconds": self.seconds}


def make_items(ids: Tensor, n: int, context: int, continuation: int, choices: int, seed: int) -> list[Item]:
    """Items from the token sequence ids [T] (see the module docstring)."""
    span = context + continuation
    if len(ids) < 4 * span:
        raise ValueError(f"{len(ids)} tokens are too few for items of {span} tokens")
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        s = rng.randrange(0, len(ids) - span)
        true = ids[s + context : s + span]
        options = [true]
        while len(options) < choices:
            o = rng.randrange(0, len(ids) - continuation)
            if abs(o - (s + context)) >= span:  # elsewhere: not overlapping the passage or its continuation
                options.append(ids[o : o + continuation])
        answer = rng.randrange(choices)
        options[0], options[answer] = options[answer], options[0]
        items.append(Item(ids[s : s + context].clone(), torch.stack(options), answer))
    return items


def pydoc_mc(tokenizer: Any, n: int = 400, context: int = 64, continuation: int = 12, choices: int = 4,
             seed: int = 0) -> list[Item]:
    """The offline task on the pydoc evaluation region."""
    ids = data._tokenize(tokenizer, data.pydoc_text())[: data.PYDOC_CALIB_START]
    return make_items(ids, n, context, continuation, choices, seed)


@torch.no_grad()
def choice_logprobs(model: nn.Module, item: Item) -> Tensor:
    """Total log p(choice | context) for every choice of one item: [k]. The context runs once (only its last
    logits are kept) and its KV cache is repeated for the k continuations: C + k·(L − 1) tokens instead of
    k·(C + L), the same numbers as scoring every [context, choice] sequence on its own."""
    k, L = item.choices.shape
    device = next(model.parameters()).device
    choices = item.choices.to(device)
    out = model(input_ids=item.context.reshape(1, -1).to(device), use_cache=True, logits_to_keep=1)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1).expand(k, -1)  # [k, V]: predicts choice token 0
    lp = first.gather(-1, choices[:, :1]).squeeze(-1)  # [k]
    if L > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(k)
        rest = model(input_ids=choices[:, :-1], past_key_values=cache, use_cache=True).logits.float()  # [k, L-1, V]
        lp = lp + F.log_softmax(rest, dim=-1).gather(-1, choices[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)
    return lp.cpu()


def score(model: nn.Module, items: list[Item], progress: Callable[[int, int], None] | None = None) -> MCResult:
    import time

    t0 = time.perf_counter()
    correct, margins = 0, []
    for i, item in enumerate(items):
        lp = choice_logprobs(model, item)
        others = torch.cat([lp[: item.answer], lp[item.answer + 1 :]])
        margins.append(float(lp[item.answer] - others.max()))
        correct += int(lp.argmax()) == item.answer
        if progress is not None:
            progress(i + 1, len(items))
    n = len(items)
    acc = correct / n
    return MCResult(acc, math.sqrt(acc * (1 - acc) / n), n, time.perf_counter() - t0, margins)
