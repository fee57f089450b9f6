"""Recipe files and --set edits

Every malformed recipe file or `--set` edit is one CompressError line naming the file or the key; YAML 1.1's
silent rewrites (base-60 numbers, duplicate keys, octal) never reach a recipe; sizes out of range name their key;
an override that matches no Linear is a warning listing it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from helpers import Verdict, tiny_llama

from compress import models, recipe
from compress.errors import CompressError
from compress.pipeline import make_plan

OVERRIDE = "overrides=[{match: '*.down_proj', bits: 8}]"  # a one-item list for the index cases


def refused(edits: list[str], needles: tuple[str, ...], name: str = "gptq-4bit") -> str:
    """recipe.load(name, edits) must raise one CompressError line holding every needle."""
    with pytest.raises(CompressError) as e:
        recipe.load(name, edits)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# --- --set syntax -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("edits", "needles"), [
    (["round.damp=[1"], ("--set round.damp", "not valid YAML", "line 1")),
    (["round.damp={a: 1"], ("--set round.damp", "not valid YAML")),
    (["round.damp=a: b: c"], ("--set round.damp", "mapping values are not allowed")),
    (["round.damp=@x"], ("--set round.damp", "cannot start any token")),
    (["round.damp='unclosed"], ("--set round.damp", "not valid YAML")),
    (["round.damp=!!python/object/apply:os.system ['true']"], ("--set round.damp", "python/object", "remove the tag")),
    (["round.damp=!!python/name:os.system"], ("--set round.damp", "remove the tag")),
    (["calibrate={samples: 1, samples: 2}"], ("--set calibrate", "duplicate key 'samples'")),
    ([OVERRIDE, "overrides.x=1"], ("--set overrides.x", "'x' is not one of its indices", "(0..0)")),
    ([OVERRIDE, "overrides.9={match: a}"], ("--set overrides.9", "'9' is not one of its indices")),
    ([OVERRIDE, "overrides.1.bits=3"], ("--set overrides.1.bits", "'1' is not one of its indices")),
    ([OVERRIDE, "overrides.-1.bits=3"], ("--set overrides.-1.bits", "'-1' is not one of its indices")),
    ([OVERRIDE, "overrides.²=3"], ("--set overrides.²", "is not one of its indices")),
    (["overrides=[]", "overrides.0.bits=3"], ("--set overrides.0.bits", "it is empty", "overrides=[...]")),
    ([OVERRIDE, "overrides.0.bits.x=3"], ("overrides.0.bits holds the value 8", "not a section")),
    (["weights.bits.x=3"], ("--set weights.bits.x", "weights.bits holds the value 4", "set weights.bits=...")),
    (["name.first=3"], ("name holds the value 'gptq-4bit'", "not a section")),
    (["=3"], ("empty part", "key.path=value")),
    ([" =3"], ("empty part",)),
    (["round..damp=0.1"], ("'round..damp'", "empty part")),
    ([".round.damp=0.1"], ("'.round.damp'", "empty part")),
    (["round.damp.=0.1"], ("'round.damp.'", "empty part")),
    (["round.damp"], ("key.path=value",)),
])
def test_bad_set_edits_are_one_line_naming_the_key(edits: list[str], needles: tuple[str, ...],
                                                   verdict: Verdict) -> None:
    refused(edits, needles)
    verdict("error")


@pytest.mark.parametrize(("edit", "get", "want"), [
    ("weights.pattern=2:4", lambda r: r.weights.pattern, "2:4"),  # YAML 1.1: 124
    ("name=12:30", lambda r: r.name, "12:30"),  # YAML 1.1: 750
    ("description=1:30.5", lambda r: r.description, "1:30.5"),  # YAML 1.1: 90.5
    ("distill.lr=1e-4", lambda r: r.distill.lr, 1e-4),  # PyYAML: the string '1e-4'
    ("round.damp=.5e-2", lambda r: r.round.config.damp, 0.005),
    ("calibrate.samples=1_024", lambda r: r.calibrate.samples, 1024),
])
def test_set_values_keep_their_meaning(edit: str, get: Callable[[recipe.Recipe], object], want: object,
                                       verdict: Verdict) -> None:
    value = get(recipe.load("gptq-4bit", [edit]))
    assert value == want and type(value) is type(want)
    verdict("correct")


def test_set_walks_into_a_list_item_and_an_empty_section(tmp_path: Path, verdict: Verdict) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("name: r\ndistill:\noverrides:\n  - {match: '*.down_proj', bits: 8}\n")
    r = recipe.load(str(p), ["overrides.0.bits=3", "distill.steps=2"])
    assert r.overrides[0].bits == 3 and r.overrides[0].match == "*.down_proj" and r.distill.steps == 2
    verdict("correct")


@pytest.mark.parametrize("edits", [
    ["weights.pattern=2:4", "name=2:4"],
    ["description='1e-4'", "name='010'"],  # strings RecipeLoader alone would read as numbers
    ["overrides=[{match: '-.5', bits: 3}, {match: '1:30', skip: true}]", "distill.lr=1e-5"],
])
def test_number_like_strings_round_trip_through_the_saved_recipe(edits: list[str], verdict: Verdict) -> None:
    r = recipe.load("gptq-4bit", edits)
    text = r.to_yaml()  # what checkpoints save as recipe.yaml: read back by us, or by anyone with safe_load
    assert recipe.from_dict(recipe.parse_yaml(text, "saved recipe")) == r
    assert recipe.from_dict(yaml.safe_load(text)) == r
    verdict("correct")


# --- recipe files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "needles"), [
    ("", ("is empty", "defaults")),
    ("# only a comment\n# and another\n", ("is empty",)),
    ("\n\n   \n", ("is empty",)),
    ("---\n...\n", ("is empty",)),
    ("~\n", ("is empty",)),
    ("- name: a\n- name: b\n", ("YAML mapping", "not a list")),
    ("gptq-4bit\n", ("YAML mapping", "not a str")),
    ("42\n", ("YAML mapping", "not a int")),
    ("name: a\nname: b\n", ("duplicate key 'name' at line 2", "first on line 1")),
    ("name: a\nweights:\n  bits: 3\n  group_size: 64\n  bits: 4\n", ("duplicate key 'bits' at line 5", "line 3")),
    ("name: a\noverrides:\n  - {match: x, bits: 3, bits: 4}\n", ("duplicate key 'bits'",)),
    ("name: a\nround: {method: gptq}\nround: {method: rtn}\n", ("duplicate key 'round' at line 3",)),
    ("weights: {bits: 3\n", ("not valid YAML",)),
    ("weights:\n\tbits: 3\n", ("not valid YAML", "line 2")),
    ("round: !!python/object/apply:os.system ['true']\n", ("remove the tag",)),
    ("round: {damp: .nan}\n", ("round.damp=nan", "finite")),
    ("calibrate: {seed: 010}\n", ("calibrate.seed='010'", "int")),  # YAML 1.1: 8, silently
    ("name: a\nweigths: {bits: 3}\n", ("unknown recipe key weigths",)),
])
def test_bad_recipe_files_are_one_line_naming_the_file(tmp_path: Path, text: str, needles: tuple[str, ...],
                                                       verdict: Verdict) -> None:
    p = tmp_path / "mine.yaml"
    p.write_text(text, encoding="utf-8")
    msg = refused([], needles, name=str(p))
    if "unknown recipe key" not in msg and "recipe value" not in msg:
        assert str(p) in msg
    verdict("error")


@pytest.mark.parametrize("raw", [
    "name: café\n".encode("latin-1"),
    "name: a\n".encode("utf-16"),
    b"\x00\xff\xfe binary \x80\x81",
])
def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path: Path, raw: bytes, verdict: Verdict) -> None:
    p = tmp_path / "enc.yaml"
    p.write_bytes(raw)
    refused([], (str(p), "not UTF-8", "save it as UTF-8"), name=str(p))
    verdict("error")


@pytest.mark.parametrize("make", ["missing", "directory", "nested-missing"])
def test_a_recipe_path_that_is_no_file_is_one_line(tmp_path: Path, make: str, verdict: Verdict) -> None:
    p = {"missing": tmp_path / "nope.yaml", "directory": tmp_path / "dir.yaml",
         "nested-missing": tmp_path / "a" / "b"}[make]
    if make == "directory":
        p.mkdir()
    refused([], (str(p), "does not exist", "gptq-4bit"), name=str(p))
    verdict("error")


def test_a_file_pattern_and_a_merge_key_keep_their_meaning(tmp_path: Path, verdict: Verdict) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("name: r\nweights: {<<: {bits: 3, group_size: 64}, bits: 2, pattern: 2:4}\n"
                 "overrides:\n  - {match: '*.down_proj', bits: 8}\n")
    r = recipe.load(str(p))
    assert (r.weights.bits, r.weights.group_size, r.weights.pattern) == (2, 64, "2:4")
    verdict("correct")


# --- sizes --------------------------------------------------------------------------------------------------

DQ = "round={method: discquant, "
EVO = "allocate={method: evopress, target_bits: 3, "


@pytest.mark.parametrize(("edit", "key"), [
    ("calibrate.samples=0", "calibrate.samples=0"),
    ("calibrate.samples=-8", "calibrate.samples=-8"),
    ("calibrate.seqlen=0", "calibrate.seqlen=0"),
    ("calibrate.batch_size=0", "calibrate.batch_size=0"),
    ("calibrate.seed=-1", "calibrate.seed=-1"),
    (DQ + "steps: 0}", "round.steps=0"),
    (DQ + "windows_per_step: 0}", "round.windows_per_step=0"),
    (DQ + "save_every: 0}", "round.save_every=0"),
    (DQ + "log_every: 0}", "round.log_every=0"),
    (DQ + "topk: -1}", "round.topk=-1"),
    (DQ + "lr: 0}", "round.lr=0"),
    (DQ + "weight_decay: -0.5}", "round.weight_decay=-0.5"),
    ("round={method: pbllm, block_size: 0}", "round.block_size=0"),
    ("round={method: pbllm, damp: -1}", "round.damp=-1"),
    ("round.block_size=0", "block_size=0"),
    (EVO + "batch_size: 0}", "allocate.batch_size=0"),
    (EVO + "topk: -1}", "allocate.topk=-1"),
    (EVO + "offspring: 0}", "allocate.offspring=0"),
    (EVO + "generations: -1}", "allocate.generations=-1"),
    (EVO + "calibration_bits: 7}", "allocate.calibration_bits=7"),
    ("allocate={method: baq, target_bits: 3, reference_bits: 9}", "allocate.reference_bits=9"),
    ("distill.steps=-1", "distill.steps=-1"),
    ("distill.save_every=0", "distill.save_every=0"),
    ("distill.log_every=0", "distill.log_every=0"),
    ("distill.windows_per_step=0", "distill.windows_per_step=0"),
    ("distill.topk=-3", "distill.topk=-3"),
    ("distill.prune_steps=-2", "distill.prune_steps=-2"),
    ("distill.temperature=0", "distill.temperature=0"),
    ("distill.iss_alpha=1.5", "distill.iss_alpha=1.5"),
    ("distill.hidden_mse=-1", "distill.hidden_mse=-1"),
    ("distill.lr=-1e-4", "distill.lr=-0.0001"),
    ("distill={train: weights, sparsity: 1.5}", "distill.sparsity=1.5"),
])
def test_sizes_out_of_range_name_their_key(edit: str, key: str, verdict: Verdict) -> None:
    refused([edit], (key,))
    verdict("error")


# --- overrides that match nothing ---------------------------------------------------------------------------

@pytest.mark.parametrize(("patterns", "unused"), [
    (["*.down_prj"], ["*.down_prj"]),
    (["*.mlp.down_proj", "model.layer.0.*", "*.q_proj"], ["model.layer.0.*"]),
    (["*.MLP.DOWN_PROJ"], ["*.MLP.DOWN_PROJ"]),  # fnmatchcase: case matters, as in the recipe
    (["*.down_proj", "lm_head"], ["lm_head"]),  # outside the blocks: never compressed
])
def test_an_override_matching_no_linear_is_a_warning_listing_it(patterns: list[str], unused: list[str],
                                                                caplog: pytest.LogCaptureFixture,
                                                                verdict: Verdict) -> None:
    m = tiny_llama()
    overrides = ", ".join(f"{{match: '{p}', bits: 8}}" for p in patterns)
    r = recipe.load("rtn-4bit", [f"overrides=[{overrides}]"])
    with caplog.at_level(logging.WARNING, logger="compress.pipeline"):
        plan = make_plan(m, models.arch_of(m), r)
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "match no Linear" in warnings[0], warnings
    for p in patterns:
        assert (repr(p) in warnings[0]) == (p in unused), (p, warnings[0])
    assert "model.layers.0.self_attn.q_proj" in warnings[0]  # shows what the names look like
    assert len(plan.layers) == 14  # the plan itself is unchanged: 2 blocks x 7 Linears
    verdict("correct")


def test_overrides_that_all_match_log_nothing(caplog: pytest.LogCaptureFixture, verdict: Verdict) -> None:
    m = tiny_llama()
    r = recipe.load("rtn-4bit", ["overrides=[{match: '*.down_proj', bits: 8}, {match: 'model.layers.0.*', "
                                 "skip: true}]"])
    with caplog.at_level(logging.WARNING, logger="compress.pipeline"):
        plan = make_plan(m, models.arch_of(m), r)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert plan.layers["model.layers.1.mlp.down_proj"].bits == 8 and "model.layers.0.mlp.up_proj" not in plan.layers
    verdict("correct")
