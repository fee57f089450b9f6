"""Recipes that say `serves: [...]` pass those formats' legality checks on SmolLM2's shapes (and the Llama-7B
ones) before any calibration, and the CLI runs the checks for them without --format."""

from __future__ import annotations

import pytest
from helpers import tiny_llama

from compress import export, models, recipe
from compress.errors import CompressError
from compress.pipeline import make_plan

SERVED = [n for n in recipe.available() if recipe.load(n).serves]
SHAPES = {"smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
          "llama-7b-widths": dict(hidden_size=512, intermediate_size=11008 // 8 * 8, num_attention_heads=8,
                                  num_key_value_heads=8)}


def test_there_are_served_recipes_for_each_width_and_an_allocation() -> None:
    assert {"gptq-4bit-serve", "gptq-3bit-serve", "baq-3bit-serve"} <= set(SERVED)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SERVED)
def test_served_recipes_pass_their_formats_checks(name: str, shape: str) -> None:
    m = tiny_llama(num_hidden_layers=1, **SHAPES[shape])
    rec = recipe.load(name)
    plan = make_plan(m, models.arch_of(m), rec)
    shapes = {n: tuple(m.get_submodule(n).weight.shape) for n in plan}
    for fmt in rec.serves:
        export.check(fmt, plan, shapes, rec)  # raises on any problem


def test_the_unserved_defaults_are_refused_on_smollm2_with_the_fix() -> None:
    m = tiny_llama(num_hidden_layers=1, **SHAPES["smollm2"])
    rec = recipe.load("gptq-4bit")  # g128 does not divide K = 576
    plan = make_plan(m, models.arch_of(m), rec)
    shapes = {n: tuple(m.get_submodule(n).weight.shape) for n in plan}
    with pytest.raises(CompressError, match="compressed-tensors cannot hold this plan") as e:
        export.check("compressed-tensors", plan, shapes, rec)
    assert "\n" not in str(e.value) and "64" in str(e.value)


def test_baq_tie_needs_layer_granularity() -> None:
    with pytest.raises(CompressError, match="granularity=layer"):
        recipe.load("baq-3bit", ["allocate.tie=true"])
