"""compress/export/gptq.py: GPTQ v1 checkpoints decode exactly to the compressed model (checked with a decoder
written here from the format's description), the config's `dynamic` map resolves every Linear to its own
setting, and problems() names every plan or recipe that cannot be written or served, with the fix."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import IDS, logits, run, tiny_llama, tiny_opt
from safetensors.torch import load_file
from torch import Tensor

import compress
from compress import checkpoint, models, recipe
from compress.errors import CompressError
from compress.export import gptq
from compress.nn import CompressedLinear
from compress.pipeline import make_plan
from compress.plan import LayerSpec, LayerWeight, Plan

# --- an independent GPTQ v1 decoder, from the format's description ----------------------------------------------


def unpack(words: Tensor, bits: int, n: int) -> Tensor:
    """int32 [W, C] packed down the columns -> int64 [n, C]: word w holds bits 32w..32w+31 of each column's stream
    (least significant first), value i is stream bits i·bits .. i·bits + bits - 1."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    stream = ((u.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1).reshape(-1, words.shape[1])  # [32W, C]
    assert stream.shape[0] == n * bits, "packed length does not match the value count"
    vals = stream.reshape(n, bits, -1)
    return (vals << torch.arange(bits).view(1, bits, 1)).sum(1)


def decode(t: dict[str, Tensor], prefix: str, bits: int, N: int, K: int) -> Tensor:
    """W [N, K] fp32 = scales[g] · (q − (stored zero + 1)), g = g_idx[k]."""
    q = unpack(t[f"{prefix}.qweight"], bits, K)  # [K, N]
    z = unpack(t[f"{prefix}.qzeros"].T.contiguous(), bits, N).T + 1  # [G, N]
    g = t[f"{prefix}.g_idx"].long()
    s = t[f"{prefix}.scales"]
    assert s.dtype == torch.float16
    return (s.float()[g] * (q - z[g]).float()).T


def resolve(qc: dict[str, Any], name: str) -> tuple[int, int, bool] | None:
    """The setting a GPTQ loader gives module `name`: the first `dynamic` key that re.match-es it ("-:" = dense,
    "+:" or no prefix = overrides of the top level), else the top level."""
    base = (qc["bits"], qc["group_size"], qc["sym"])
    for key, over in qc.get("dynamic", {}).items():
        pattern = key[2:] if key[:2] in ("+:", "-:") else key
        if re.match(pattern, name):
            if key.startswith("-:"):
                return None
            return (over.get("bits", base[0]), over.get("group_size", base[1]), over.get("sym", base[2]))
    return base


def export(res: compress.Result, out: Path, dtype: torch.dtype = torch.float16) -> tuple[dict[str, Tensor], dict]:
    gptq.write(res.model, None, res.plan, out, dtype=dtype)
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors, json.loads((out / "config.json").read_text())


def check_exact(res: compress.Result, tensors: dict[str, Tensor], qc: dict[str, Any]) -> None:
    for name in res.plan:
        m = res.model.get_submodule(name)
        assert isinstance(m, CompressedLinear)
        bits, group_size, sym = resolve(qc, name)  # type: ignore[misc]
        spec = m.spec
        assert (bits, group_size, sym) == (spec.bits, spec.group_size, spec.symmetric), name
        N, K = m.out_features, m.in_features
        G = 1 if group_size == -1 else K // group_size
        assert tensors[f"{name}.qweight"].shape == (K * bits // 32, N)
        assert tensors[f"{name}.qzeros"].shape == (G, N * bits // 32)
        assert tensors[f"{name}.scales"].shape == (G, N)
        assert torch.equal(tensors[f"{name}.g_idx"], (torch.arange(K) // (K if group_size == -1 else group_size))
                           .to(torch.int32))
        assert torch.equal(decode(tensors, name, bits, N, K), m.dequantize()), name
        assert f"{name}.weight" not in tensors


# --- exact round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_export_decodes_exactly_to_the_compressed_model(bits: int, group_size: int, sym: bool,
                                                        tmp_path: Path) -> None:
    res = run(tiny_llama(), "rtn-4bit", (f"weights.bits={bits}", f"weights.group_size={group_size}",
                                         f"weights.symmetric={str(sym).lower()}"))
    tensors, config = export(res, tmp_path)
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["format"] == "gptq"
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (bits, group_size, sym, False)
    assert "dynamic" not in qc and "modules_in_block_to_quantize" not in qc
    assert config["dtype"] == "float16"
    check_exact(res, tensors, qc)
    dense = {k: v for k, v in tensors.items() if k.endswith((".weight", ".bias"))}
    assert dense and all(v.dtype == torch.float16 for v in dense.values())
    assert "lm_head.weight" not in tensors  # tied to the embeddings; the loader ties it again
    assert (tmp_path / "README.md").is_file() and (tmp_path / "generation_config.json").is_file()


def test_gptq_rounded_opt_with_biases_decodes_exactly(tmp_path: Path) -> None:
    """Real GPTQ codes (act-order, static groups) on OPT, whose Linears have biases and fc1/fc2 names."""
    res = run(tiny_opt(), "gptq-3bit", ("round.act_order=true",))
    tensors, config = export(res, tmp_path, dtype=torch.bfloat16)
    check_exact(res, tensors, config["quantization_config"])
    for name in res.plan:
        assert torch.equal(tensors[f"{name}.bias"], res.model.get_submodule(name).bias.to(torch.bfloat16))


MIXED = ("overrides=[{match: model.layers.0.mlp.down_proj, skip: true}, "
         "{match: '*.mlp.down_proj', bits: 8, group_size: -1, symmetric: true}, {match: '*.mlp.*', bits: 2}, "
         "{match: 'model.layers.1.self_attn.*', bits: 3, symmetric: true}]")


def test_mixed_widths_go_through_the_dynamic_map(tmp_path: Path, tokenizer: Any) -> None:
    res = run(tiny_llama(), "rtn-4bit", (MIXED,))
    gptq.write(res.model, tokenizer, res.plan, tmp_path, dtype=torch.float16)
    tensors = load_file(tmp_path / "model.safetensors")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    # gate/up (2-bit asym g32) hold the most weights; 8-bit symmetric per-row down_proj would be a Marlin setting,
    # which may not be on top while other Linears are not (vLLM would pick gptq_marlin and refuse their overrides)
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (2, 32, False)
    assert resolve(qc, "model.layers.1.mlp.down_proj") == (8, -1, True)
    check_exact(res, tensors, qc)
    dense = "model.layers.0.mlp.down_proj"
    assert resolve(qc, dense) is None and tensors[f"{dense}.weight"].dtype == torch.float16
    assert qc["modules_in_block_to_quantize"] == [list(res.plan)]
    for block in ("model.layers.0", "model.layers.1"):  # vLLM's fused names resolve like their shards
        for fused, members in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                               ("mlp.gate_up_proj", ("gate_proj", "up_proj"))):
            parent = fused.rpartition(".")[0]
            assert {resolve(qc, f"{block}.{parent}.{m}") for m in members} == {resolve(qc, f"{block}.{fused}")}
    assert resolve(qc, "model.layers.1.self_attn.qkv_proj") == (3, 32, True)
    assert (tmp_path / "tokenizer.json").is_file()
    text = (tmp_path / "README.md").read_text()
    assert "dynamic" in text and "not readable" in text  # transformers (optimum) ignores `dynamic`


def test_an_all_marlin_plan_keeps_the_most_common_setting_on_top(tmp_path: Path) -> None:
    res = run(tiny_llama(), "rtn-4bit", ("weights.symmetric=true", "overrides=[{match: '*.mlp.*', bits: 8}]"))
    _, config = export(res, tmp_path)
    qc = config["quantization_config"]
    assert (qc["bits"], qc["sym"]) == (8, True)  # the MLP holds most weights
    assert qc["dynamic"] and all(v == {"bits": 4, "group_size": 32, "sym": True} for v in qc["dynamic"].values())
    assert "Marlin" in (tmp_path / "README.md").read_text()


def test_large_exports_are_sharded_with_an_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gptq, "SHARD_BYTES", 40_000)
    res = run(tiny_llama(), "rtn-4bit")
    tensors, config = export(res, tmp_path)
    index = json.loads((tmp_path / gptq.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(tensors)
    assert not (tmp_path / gptq.WEIGHTS).exists()
    check_exact(res, tensors, config["quantization_config"])


# --- v1 zero points and scale dtypes ---------------------------------------------------------------------------


def one_layer_model(lw: LayerWeight) -> tuple[torch.nn.Module, Plan]:
    """tiny_llama with layer 0's o_proj replaced by the packed `lw` (the other Linears stay dense)."""
    from compress.nn import set_module

    m = tiny_llama()
    name = "model.layers.0.self_attn.o_proj"
    set_module(m, name, CompressedLinear.from_weight(lw))
    return m, Plan({name: lw.spec})


def test_a_zero_point_of_zero_moves_up_one_code_when_the_codes_leave_room(tmp_path: Path) -> None:
    spec = LayerSpec(bits=4, group_size=32, symmetric=False)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 15, (64, 64), generator=g).to(torch.uint8)  # never the top code 15
    zero = torch.randint(1, 15, (64, 2), generator=g).float()
    zero[:5, 0] = 0  # v1 stores zero - 1: these have no direct form
    scale = (torch.rand(64, 2, generator=g) * 0.01 + 1e-3).half().float()
    lw = LayerWeight(torch.zeros(64, 64), spec, codes, scale, zero)
    m, plan = one_layer_model(lw)
    gptq.write(m, None, plan, tmp_path, dtype=torch.float16)
    t = load_file(tmp_path / "model.safetensors")
    name = next(iter(plan))
    assert torch.equal(decode(t, name, 4, 64, 64), lw.dequantize())
    dense = {k.removesuffix(".weight") for k in t if k.endswith("proj.weight")}
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert dense and all(resolve(qc, n) is None for n in dense) and resolve(qc, name) is not None


def test_a_zero_point_of_zero_with_the_top_code_is_refused(tmp_path: Path) -> None:
    spec = LayerSpec(bits=2, group_size=-1, symmetric=False)
    codes = torch.full((64, 64), 3, dtype=torch.uint8)
    lw = LayerWeight(torch.zeros(64, 64), spec, codes, torch.full((64, 1), 0.01).half().float(), torch.zeros(64, 1))
    m, plan = one_layer_model(lw)
    with pytest.raises(CompressError, match=r"o_proj: 64 groups have zero point 0 .*fix: weights.symmetric=true"):
        gptq.write(m, None, plan, tmp_path, dtype=torch.float16)
    assert not (tmp_path / "config.json").exists()


def test_bfloat16_scales_convert_exactly(tmp_path: Path) -> None:
    res = run(tiny_llama(), "rtn-4bit", ("weights.scale_dtype=bfloat16",))
    tensors, config = export(res, tmp_path)
    check_exact(res, tensors, config["quantization_config"])
    assert "bit-exact export" in (tmp_path / "README.md").read_text()


def test_float32_scales_are_rounded_to_fp16_and_said_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    res = run(tiny_llama(), "rtn-4bit", ("weights.scale_dtype=float32",))
    with caplog.at_level(logging.WARNING, logger="compress.export.gptq"):
        tensors, _ = export(res, tmp_path)
    assert "not bit-exact" in caplog.text and "not bit-exact" in (tmp_path / "README.md").read_text()
    for name in res.plan:
        m = res.model.get_submodule(name)
        W = decode(tensors, name, 4, m.out_features, m.in_features)
        ref = m.dequantize()
        assert torch.allclose(W, ref, rtol=2**-11, atol=0)


def test_write_refuses_a_plan_with_problems_in_one_line(tmp_path: Path) -> None:
    res = run(tiny_llama(), "rtn-4bit", ("weights.bits=5",))
    with pytest.raises(CompressError) as e:
        gptq.write(res.model, None, res.plan, tmp_path, dtype=torch.float16)
    assert "\n" not in str(e.value) and "5-bit codes" in str(e.value)
    with pytest.raises(CompressError, match="not a CompressedLinear"):
        gptq.write(tiny_llama(), None, res.plan, tmp_path, dtype=torch.float16)


# --- a GPTQ loader, when one is installed ----------------------------------------------------------------------

HAS_LOADER = importlib.util.find_spec("gptqmodel") is not None and importlib.util.find_spec("optimum") is not None


@pytest.mark.skipif(not HAS_LOADER, reason="transformers reads GPTQ through optimum + gptqmodel, not installed here: "
                    "gptqmodel 7.7 ships as an sdist that declares torch>=2.14.1 and builds the pypcre C extension, "
                    "so it is not a dependency (`pip install --no-deps gptqmodel optimum pypcre logbar tokenicer "
                    "device-smi defuser` runs this test on CPU)")
@pytest.mark.parametrize("edits", [("weights.group_size=32",),
                                   ("weights.bits=3", "weights.symmetric=true", "weights.group_size=-1")])
def test_transformers_loads_the_export_on_cpu(edits: tuple[str, ...], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    res = run(tiny_llama(), "rtn-4bit", edits)
    checkpoint.save(res.model, None, res.plan, res.recipe, tmp_path / "compressed", card="card")
    loaded = compress.load(tmp_path / "compressed", dtype=torch.float32)
    expected = logits(loaded)
    gptq.write(loaded, None, res.plan, tmp_path / "gptq", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", dtype=torch.float32, device_map="cpu")
    with torch.no_grad():
        got = model(IDS).logits
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-3


# --- problems(): every reason, one line each, with the fix -------------------------------------------------------

SMOLLM2 = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
           "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
           "mlp.down_proj": (576, 1536)}
TINY = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
        "self_attn.o_proj": (64, 64), "mlp.gate_proj": (160, 64), "mlp.up_proj": (160, 64),
        "mlp.down_proj": (64, 160)}


def layers(table: dict[str, tuple[int, int]], blocks: int = 2) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{b}.{k}": v for b in range(blocks) for k, v in table.items()}


def plan_of(shapes: dict[str, tuple[int, int]], **changes: LayerSpec) -> Plan:
    """4-bit asym g32 everywhere, except the Linears whose leaf (e.g. q_proj) is in `changes` (None: dense)."""
    out = {}
    for name in shapes:
        spec = changes.get(name.rpartition(".")[2], LayerSpec(bits=4, group_size=32))
        if spec is not None:
            out[name] = spec
    return Plan(out)


def one_problem(lines: list[str], *needles: str) -> str:
    assert len(lines) == 1, lines
    assert "\n" not in lines[0] and "fix:" in lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_a_plain_affine_plan_has_no_problems() -> None:
    assert gptq.problems(plan_of(layers(TINY)), layers(TINY)) == []


@pytest.mark.parametrize(("spec", "needles"), [
    (LayerSpec(bits=1, group_size=32, binary=True), ("binary", "weights.binary=false", "skip: true")),
    (LayerSpec(bits=3, group_size=-1, levels=(8,) * 64), ("per-column levels", "allocate.granularity=layer")),
    (LayerSpec(bits=4, group_size=32, sparsity=0.5), ("pruned", "drop the sparsity")),
    (LayerSpec(bits=(2, 3), group_size=32), ("widths differ between the groups", "allocate.granularity=layer",
                                            "evopress")),
    (LayerSpec(bits=5, group_size=32), ("5-bit codes", "2, 3, 4 or 8")),
])
def test_layers_gptq_cannot_hold_are_named_with_the_fix(spec: LayerSpec, needles: tuple[str, ...]) -> None:
    shapes = layers(TINY)
    line = one_problem(gptq.problems(plan_of(shapes, o_proj=spec), shapes), *needles)
    assert line.startswith("model.layers.{0-1}.self_attn.o_proj: ")


def test_a_group_size_that_does_not_divide_in_features_is_named_with_divisors() -> None:
    shapes = layers(SMOLLM2, 30)
    plan = Plan({n: LayerSpec(bits=4, group_size=128) for n in shapes})
    line = one_problem(gptq.problems(plan, shapes), "group_size=128 does not divide in_features=576",
                       "weights.group_size=64 or 192", "-1 (per row)")
    names = line.split(": ", 1)[0]
    assert names.startswith("model.layers.{0-29}.self_attn.{q_proj,k_proj,v_proj,o_proj}") and "down_proj" not in names


def test_shapes_that_are_not_whole_runs_of_32_are_named() -> None:
    shapes = {**layers(TINY), "model.layers.0.self_attn.o_proj": (48, 64)}
    one_problem(gptq.problems(plan_of(shapes), shapes), "model.layers.0.self_attn.o_proj",
                "out_features=48", "multiples of 32", "skip: true")


def test_fused_sets_with_different_settings_are_named() -> None:
    shapes = layers(TINY)
    line = one_problem(gptq.problems(plan_of(shapes, k_proj=LayerSpec(bits=3, group_size=32)), shapes),
                       "model.layers.{0-1}.self_attn.{q_proj,k_proj,v_proj}", "qkv_proj", "k_proj 3-bit",
                       "1 more sets", "tie: true")
    assert "q_proj 4-bit g32 asym" in line
    one_problem(gptq.problems(plan_of(shapes, up_proj=None), shapes), "gate_up_proj", "up_proj dense")


# problems() from the recipe alone, before calibration: the base plan make_plan() builds, and the allocator's settings

def recipe_problems(name: str, *edits: str, table: dict[str, tuple[int, int]] | None = None) -> list[str]:
    r = recipe.load(name, list(edits))
    if table is None:
        model = tiny_llama()
        plan = make_plan(model, models.arch_of(model), r)
        shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in plan}
    else:
        shapes = layers(table)
        plan = Plan({n: s for n in shapes if (s := r.layer_spec(n)) is not None})
    return gptq.problems(plan, shapes, r)


PIN_FUSED = "[{match: '*.self_attn.[qkv]_proj', bits: 4}, {match: '*.mlp.gate_proj', bits: 4}, " \
            "{match: '*.mlp.up_proj', bits: 4}]"  # baq granularity=layer leaves pinned Linears alone


def test_recipes_that_export_have_no_problems() -> None:
    assert recipe_problems("gptq-4bit", "weights.group_size=32") == []
    assert recipe_problems("evopress-3bit", "weights.group_size=32", "allocate.choices=[2, 3, 4]",
                           "allocate.tie=true") == []
    assert recipe_problems("baq-3bit", "weights.group_size=32", "allocate.granularity=layer",
                           f"overrides={PIN_FUSED}") == []


def test_recipe_problems_name_the_fix() -> None:
    one_problem(recipe_problems("gptq-4bit", table=SMOLLM2), "weights.group_size=64 or 192")
    one_problem(recipe_problems("baq-3bit", "weights.group_size=32"), "baq granularity=group",
                "allocate.granularity=layer", "allocate.method=evopress")
    one_problem(recipe_problems("baq-3bit", "weights.group_size=32", "allocate.granularity=layer"),
                "baq granularity=layer", "q_proj/k_proj/v_proj", "allocate.tie=true")
    assert recipe_problems("baq-3bit", "weights.group_size=32", "allocate.granularity=layer",
                           "allocate.tie=true") == []  # tied BAQ is servable
    one_problem(recipe_problems("baq-3bit-faithful"), "granularity=column", "allocate.granularity=layer")
    one_problem(recipe_problems("baq-3bit", "weights.group_size=32", "allocate.granularity=layer",
                                "allocate.choices=[2, 3, 4, 6]", f"overrides={PIN_FUSED}"),
                "choices=[2, 3, 4, 6] include [6]", "allocate.choices=[2, 3, 4, 8]")
    evo = recipe_problems("evopress-3bit", "weights.group_size=32")
    assert len(evo) == 2 and all("\n" not in line and "fix:" in line for line in evo)
    assert "choices=[2, 3, 4, 5, 6] include [5, 6]" in evo[0] and "allocate.choices=[2, 3, 4]" in evo[0]
    assert "tie: false" in evo[1] and "allocate.tie=true" in evo[1]
    one_problem(recipe_problems("binary", "weights.group_size=32"), "binary layers")
    pinned = recipe_problems("evopress-3bit", "weights.group_size=32", "allocate.choices=[2, 3, 4]",
                             "allocate.tie=true", "overrides=[{match: '*.q_proj', bits: 8}]")
    one_problem(pinned, "q_proj 8-bit g32 asym", "k_proj allocated-width g32 asym")
