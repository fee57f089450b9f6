"""ggml_baq: a ggml type per Linear under a budget counted as llama.cpp counts it, from measured GPTQ losses."""

from __future__ import annotations

import itertools
import random

from helpers import SMALL, tiny_llama

import compress
from compress import ggml, recipe
from compress.allocate import ggml_baq

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_choose_is_optimal_on_small_instances() -> None:
    """Against brute force over every assignment: within the budget, and at most one hull step from the optimum
    (the greedy is exact on the convex relaxation)."""
    rng = random.Random(0)
    types = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
    for _ in range(30):
        names = [f"l{i}" for i in range(4)]
        numel = {n: rng.choice([1, 2, 4]) * 1000 for n in names}
        errors = {n: {t: 2.0 ** (-2 * ggml.TYPES[t].bpw) * rng.uniform(0.5, 2) for t in types} for n in names}
        target = rng.uniform(2.7, 6.4)
        got = ggml_baq.choose(errors, numel, target)
        cost = sum(numel[n] * ggml.TYPES[t].bpw for n, t in got.items()) / sum(numel.values())
        assert cost <= target + 1e-9
        best = min((sum(errors[n][t] for n, t in zip(names, combo, strict=True)), combo)
                   for combo in itertools.product(types, repeat=len(names))
                   if sum(numel[n] * ggml.TYPES[t].bpw for n, t in zip(names, combo, strict=True))
                   <= target * sum(numel.values()) + 1e-9)
        assert sum(errors[n][t] for n, t in got.items()) <= 2.5 * best[0]


def test_a_tiny_model_at_the_q4_k_m_budget() -> None:
    """The allocation spends no more than llama.cpp's Q4_K_M mix would on the same model, and its summed relative
    error (measured, pass 1) is no larger than that of the mix's own types."""
    res = compress.compress(tiny_llama(**SHAPE), None, recipe.load("gguf-baq-q4_k_m", SMALL))
    a = res.allocation
    assert a["method"] == "ggml_baq" and a["bpw"] <= a["target_bpw"] + 1e-9
    assert a["relative_error"] <= a["rules_relative_error"]
    assert all(s.kind == "ggml" for s in res.plan.layers.values())
