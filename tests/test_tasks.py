"""The offline multiple-choice task: items are well formed and seeded, and scoring equals a slow
token-by-token computation."""

from __future__ import annotations

import math

import torch
from helpers import tiny_llama

from compress import tasks

IDS = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(3))


def test_items_hold_the_true_continuation_at_the_answer_and_are_seeded() -> None:
    items = tasks.make_items(IDS, 50, context=16, continuation=6, choices=4, seed=1)
    again = tasks.make_items(IDS, 50, context=16, continuation=6, choices=4, seed=1)
    assert all(torch.equal(a.choices, b.choices) and a.answer == b.answer for a, b in zip(items, again, strict=True))
    for it in items:
        assert it.choices.shape == (4, 6)
        starts = [s for s in range(len(IDS) - 22) if torch.equal(IDS[s : s + 16], it.context)]
        assert any(torch.equal(IDS[s + 16 : s + 22], it.choices[it.answer]) for s in starts)
    assert len({it.answer for it in items}) == 4  # the answer moves around


@torch.no_grad()
def slow_logprob(model: torch.nn.Module, context: torch.Tensor, choice: torch.Tensor) -> float:
    """Σ_t log p(choice_t | context, choice_<t), one forward per token."""
    total, prefix = 0.0, context.clone()
    for tok in choice.tolist():
        logits = model(input_ids=prefix.unsqueeze(0)).logits[0, -1].double()
        total += float(logits.log_softmax(-1)[tok])
        prefix = torch.cat([prefix, torch.tensor([tok])])
    return total


def test_scores_equal_a_token_by_token_computation() -> None:
    m = tiny_llama().eval()
    items = tasks.make_items(IDS, 6, context=10, continuation=4, choices=3, seed=2)
    for it in items[:3]:
        fast = tasks.choice_logprobs(m, it)
        slow = torch.tensor([slow_logprob(m, it.context, c) for c in it.choices], dtype=torch.float32)
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    res = tasks.score(m, items)
    expected = sum(int(tasks.choice_logprobs(m, it).argmax()) == it.answer for it in items) / len(items)
    assert res.accuracy == expected and res.n == 6
    assert res.stderr == math.sqrt(expected * (1 - expected) / 6)
