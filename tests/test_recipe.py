"""Recipes load strictly: every named recipe is valid, every mistake names itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress import recipe
from compress.errors import CompressError
from compress.round import gptq


@pytest.mark.parametrize("name", recipe.available())
def test_every_named_recipe_loads_and_round_trips(name: str) -> None:
    r = recipe.load(name)
    assert r.name == name and r.description
    assert recipe.from_dict(__import__("yaml").safe_load(r.to_yaml())) == r


def test_trunk_recipes_exist_with_their_grids() -> None:
    expect = {"rtn-4bit": (4, 128), "gptq-4bit": (4, 128), "gptq-3bit": (3, 128), "gptq-2bit": (2, 64)}
    for name, (bits, group) in expect.items():
        w = recipe.load(name).weights
        assert (w.bits, w.group_size, w.symmetric) == (bits, group, False)


def test_set_edits_are_typed() -> None:
    r = recipe.load("gptq-3bit", ["round.damp=0.1", "round.act_order=true", "calibrate.samples=4"])
    assert r.round.config == gptq.Config(damp=0.1, act_order=True)
    assert r.calibrate.samples == 4


@pytest.mark.parametrize(("edit", "needle"), [
    ("round.dmap=0.1", "round.dmap"),  # unknown key names itself and the valid ones
    ("calibrate.sample=4", "samples"),
    ("round.damp=abc", "round.damp='abc'"),
    ("weights.bits=9", "bits=9"),
    ("weights.group_size=0", "group_size=0"),
    ("round.method=awq", "rtn, gptq"),
    ("weights.scale_dtype=int8", "float16"),
    ("overrides=[{match: '*', bitz: 3}]", "bitz"),
    ("calibrate=3", "mapping"),
    ("nonsense", "key.path=value"),
])
def test_bad_recipes_are_clear_errors(edit: str, needle: str) -> None:
    with pytest.raises(CompressError) as e:
        recipe.load("gptq-4bit", [edit])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_overrides_first_match_wins() -> None:
    r = recipe.load("gptq-4bit", ["overrides=[{match: '*.down_proj', bits: 8}, {match: '*proj', bits: 2}]"])
    assert r.layer_spec("model.layers.3.mlp.down_proj").bits == 8
    assert r.layer_spec("model.layers.3.mlp.up_proj").bits == 2


def test_recipe_from_a_path(tmp_path: Path) -> None:
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nweights: {bits: 3}\nround: {method: rtn}\n")
    r = recipe.load(str(p))
    assert r.weights.bits == 3 and r.round.method == "rtn"
