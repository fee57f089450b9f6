"""compress/export/compressed_tensors.py: our packed layers -> compressed-tensors `pack-quantized`, decoded by the
`compressed_tensors` package itself (never by our code), loaded by transformers in a process that never imports
compress, and every reason a plan cannot be exported reported as one line with its fix."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ct_pkg = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.utils.match import match_name  # noqa: E402
from helpers import IDS, layer, logits, run, tiny_llama  # noqa: E402

import compress  # noqa: E402
from compress import checkpoint, recipe  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.export import compressed_tensors as ct  # noqa: E402
from compress.plan import LayerSpec, Plan  # noqa: E402

VERSION = tuple(int(x) for x in ct_pkg.__version__.split(".")[:2])
INSTALLED = "dense" if VERSION >= (0, 18) else "padded"  # the layout the installed package decodes
OTHER = "padded" if INSTALLED == "dense" else "dense"
N, K = 40, 96  # N: the zero points' packed dim is not a multiple of 32 // b; K: three groups of 32


def decompress(tensors: dict[str, torch.Tensor], spec: LayerSpec) -> torch.Tensor:
    """compressed-tensors' own decode of one layer's exported tensors, with the scheme our config writes."""
    scheme = QuantizationScheme.model_validate(
        {"targets": ["Linear"], "weights": ct._weights_args(ct.scheme(spec, tensors["weight_shape"][1].item()))})
    return PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]


# --- 1. exact round trip through the package's decompressor ----------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, -1], ids=["g32", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_package_decodes_our_layer_exactly(bits: int, group_size: int, symmetric: bool) -> None:
    m = layer(LayerSpec(bits=bits, group_size=group_size, symmetric=symmetric), N=N, K=K)
    t = ct.layer_tensors(m, torch.float32, INSTALLED)
    G = K // group_size if group_size > 0 else 1
    assert t["weight_packed"].dtype == torch.int32 and t["weight_shape"].tolist() == [N, K]
    assert t["weight_scale"].shape == (N, G)
    assert ("weight_zero_point" in t) == (not symmetric)
    if not symmetric:
        assert t["weight_zero_point"].dtype == torch.int32
        assert t["weight_zero_point"].shape == (math.ceil(N * bits / 32) if INSTALLED == "dense" else
                                                math.ceil(N / (32 // bits)), G)
    W = decompress(t, m.spec)
    assert W.dtype == torch.float32 and torch.equal(W, m.dequantize())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_in_a_16_bit_model_the_weight_is_ours_rounded_once(dtype: torch.dtype) -> None:
    """Loaders build weight_scale in the model dtype and decode in it: with scales of that dtype the decoded
    weight is W_hat rounded once to it, which is what our layer gives in that dtype."""
    name = str(dtype).removeprefix("torch.")
    for sym in (True, False):
        m = layer(LayerSpec(bits=4, group_size=32, symmetric=sym, scale_dtype=name), N=N, K=K)
        W = decompress(ct.layer_tensors(m, dtype, INSTALLED), m.spec)
        assert W.dtype == dtype and torch.equal(W, m.dequantize().to(dtype))


def test_a_mixed_width_plan_is_one_config_group_per_scheme_and_decodes_exactly() -> None:
    specs = {"model.layers.0.self_attn.q_proj": LayerSpec(bits=4, group_size=32, symmetric=True),
             "model.layers.0.self_attn.o_proj": LayerSpec(bits=3, group_size=32, symmetric=False),
             "model.layers.0.mlp.down_proj": LayerSpec(bits=8, group_size=-1, symmetric=True),
             "model.layers.1.self_attn.q_proj": LayerSpec(bits=2, group_size=32, symmetric=False),
             "model.layers.1.self_attn.o_proj": LayerSpec(bits=3, group_size=32, symmetric=False)}
    plan = Plan(specs)
    mods = {n: layer(s, N=N, K=K, seed=i) for i, (n, s) in enumerate(specs.items())}
    linears = [*specs, "lm_head"]
    qc = ct.quantization_config(plan, {n: (N, K) for n in specs}, linears, INSTALLED)
    QuantizationConfig.model_validate(qc)  # the package accepts it
    assert len(qc["config_groups"]) == 4 and qc["ignore"] == ["lm_head"]
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] in ("group", "channel")
    for name, m in mods.items():
        groups = [g for g in qc["config_groups"].values() if any(match_name(name, t) for t in g["targets"])]
        assert len(groups) == 1, name  # every planned Linear resolves to exactly one scheme
        scheme = QuantizationScheme.model_validate(groups[0])
        assert scheme.weights.num_bits == m.spec.bits
        W = PackedQuantizationCompressor.decompress(ct.layer_tensors(m, torch.float32, INSTALLED), scheme)["weight"]
        assert torch.equal(W, m.dequantize())
    assert not any(match_name("lm_head", t) for g in qc["config_groups"].values() for t in g["targets"])


def spec_unpack(words: torch.Tensor, bits: int, n: int, layout: str) -> torch.Tensor:
    """The published bit layouts, decoded independently of both the package and the exporter: value i of a row
    at bit i·b of the row's LSB-first bit stream ("dense", compressed-tensors >= 0.18) or at bit (i % p)·b of
    word i // p with p = 32 // b ("padded", <= 0.17)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(w.shape[0], n, dtype=torch.int64)
    for i in range(n):
        if layout == "padded":
            p = 32 // bits
            out[:, i] = (w[:, i // p] >> ((i % p) * bits)) & ((1 << bits) - 1)
        else:
            value = 0
            for j in range(bits):  # bit j of value i is stream bit i·b + j
                s = i * bits + j
                value = value | (((w[:, s // 32] >> (s % 32)) & 1) << j)
            out[:, i] = value
    return out


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_the_other_layout_follows_the_published_spec(bits: int) -> None:
    m = layer(LayerSpec(bits=bits, group_size=32, symmetric=False), N=N, K=K)
    t = ct.layer_tensors(m, torch.float32, OTHER)
    words = math.ceil(K / (32 // bits)) if OTHER == "padded" else math.ceil(K * bits / 32)
    assert t["weight_packed"].shape == (N, words)
    assert torch.equal(spec_unpack(t["weight_packed"], bits, K, OTHER), m.codes().long())
    zero = spec_unpack(t["weight_zero_point"].T, bits, N, OTHER).T
    assert torch.equal(zero, m.zero_points().long())
    mine = ct.layer_tensors(m, torch.float32, INSTALLED)["weight_packed"]  # what the package reads
    assert mine.shape != t["weight_packed"].shape
    assert torch.equal(spec_unpack(mine, bits, K, INSTALLED), m.codes().long())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_power_of_two_widths_are_the_same_bytes_in_both_layouts(bits: int) -> None:
    m = layer(LayerSpec(bits=bits, group_size=-1, symmetric=False), N=N, K=K)
    dense, padded = (ct.layer_tensors(m, torch.float32, lay) for lay in ("dense", "padded"))
    assert all(torch.equal(dense[k], padded[k]) for k in dense)


# --- 2. a whole model: exported, loaded by transformers without compress ---------------------------------------

LOAD = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
path, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(path).eval()
with torch.no_grad():
    out = {"logits": model(load_file(ids_file)["ids"]).logits}
out.update({n + ".weight": m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
assert not any(m == "compress" or m.startswith("compress.") for m in sys.modules), "imported compress"
save_file({k: v.contiguous() for k, v in out.items()}, out_file, metadata={"dtype": str(model.dtype)})
"""


def load_elsewhere(path: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    """from_pretrained(path) in a fresh interpreter (same packages, cwd outside the repo) that checks it never
    imported compress."""
    save_file({"ids": IDS.contiguous()}, tmp / "ids.safetensors")
    # no PYTHONPATH: a checkout on it would offer our kernels/ as a top-level `kernels`, which transformers probes
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", LOAD, str(path), str(tmp / "ids.safetensors"),
                           str(tmp / "out.safetensors")],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def compress_and_export(tmp: Path, edits: tuple[str, ...], dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    res = run(tiny_llama(), "gptq-4bit", edits)
    ck, out = tmp / "ck", tmp / "ct"
    checkpoint.save(res.model, None, res.plan, res.recipe, ck, card="card")
    model = compress.load(ck)
    ct.write(model, None, res.plan, out, dtype=dtype)
    return ck, out


MIXED = ("weights.symmetric=true",
         "overrides=[{match: '*.mlp.down_proj', bits: 8, group_size: -1}, {match: '*.self_attn.o_proj', bits: 3}, "
         "{match: 'model.layers.1.mlp.*', bits: 2}]")


def check_load(tmp: Path, ck: Path, out: Path) -> None:
    p = load_elsewhere(out, tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    got = load_file(tmp / "out.safetensors")
    with safe_open(tmp / "out.safetensors", "pt") as f:
        got_dtype = f.metadata()["dtype"]
    ours = compress.load(ck)
    want = logits(ours)
    assert got_dtype == "torch.float32"
    assert ((got["logits"] - want).abs().max() / want.abs().max()).item() <= 1e-3
    for name, m in ours.named_modules():
        if isinstance(m, compress.CompressedLinear):
            assert torch.equal(got[f"{name}.weight"], m.dequantize()), name


def test_transformers_loads_the_export_without_compress(tmp_path: Path) -> None:
    ck, out = compress_and_export(tmp_path, MIXED)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["version"] == ct.VERSIONS["dense"]
    assert "lm_head" in qc["ignore"] and cfg["dtype"] == cfg["torch_dtype"] == "float32"
    schemes = sorted((g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["group_size"],
                      g["weights"]["symmetric"]) for g in qc["config_groups"].values())
    assert schemes == [(2, "group", 32, True), (3, "group", 32, True), (4, "group", 32, True),
                       (8, "channel", None, True)]
    assert "Marlin" in (out / "README.md").read_text() and "Humming" in (out / "README.md").read_text()
    check_load(tmp_path, ck, out)


def test_transformers_loads_an_asymmetric_export_with_compressed_tensors_0_17(tmp_path: Path) -> None:
    """0.18-0.20 compress the meta model before loading without packing weight_zero_point, so transformers expects
    [N, G] where the file (like llm-compressor's own, and what vLLM reads) has the packed [ceil(N*b/32), G]."""
    ck, out = compress_and_export(tmp_path, ())
    if VERSION < (0, 18):
        check_load(tmp_path, ck, out)
        return
    p = load_elsewhere(out, tmp_path)
    assert p.returncode != 0, f"compressed-tensors {ct_pkg.__version__} loads asymmetric exports now: update the docs"
    assert "weight_zero_point" in p.stderr and "MISMATCH" in p.stderr, p.stderr[-3000:]
    pytest.xfail(f"compressed-tensors {ct_pkg.__version__} cannot load asymmetric pack-quantized in transformers")


def test_write_refuses_scales_the_dtype_would_round(tmp_path: Path) -> None:
    res = run(tiny_llama(), "rtn-4bit", ("weights.symmetric=true",))  # float16 scales
    with pytest.raises(CompressError, match=r"float16 scales are rounded to bfloat16.*scale_dtype=bfloat16"):
        ct.write(res.model, None, res.plan, tmp_path / "x", dtype=torch.bfloat16)
    ct.write(res.model, None, res.plan, tmp_path / "y", dtype=torch.bfloat16, exact=False)
    assert (tmp_path / "y" / "model.safetensors").is_file()


def test_bfloat16_scales_go_into_a_float16_export_exactly_or_are_refused(tmp_path: Path) -> None:
    res = run(tiny_llama(), "rtn-4bit", ("weights.symmetric=true", "weights.scale_dtype=bfloat16"))
    ct.write(res.model, None, res.plan, tmp_path / "x", dtype=torch.float16)
    stored = load_file(tmp_path / "x" / "model.safetensors")
    for n in res.plan:
        scale = res.model.get_submodule(n).packed()["scale"]
        assert torch.equal(stored[f"{n}.weight_scale"].to(torch.bfloat16), scale)  # bf16 -> fp16 -> bf16 exact
    q = res.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.scale[0, 0] = 2.0**20  # beyond fp16's range
    with pytest.raises(CompressError, match=r"model.layers.0.self_attn.q_proj: bfloat16 scales outside float16"):
        ct.write(res.model, None, res.plan, tmp_path / "y", dtype=torch.float16)


def test_write_refuses_what_problems_reports(tmp_path: Path) -> None:
    res = run(tiny_llama(), "rtn-4bit", ("weights.group_size=48",))  # 64 = 48 + a narrower 16
    with pytest.raises(CompressError, match="does not divide in_features=64"):
        ct.write(res.model, None, res.plan, tmp_path / "x", dtype=torch.float32)
    with pytest.raises(CompressError, match="not packed"):
        ct.write(tiny_llama(), None, res.plan, tmp_path / "x", dtype=torch.float32)


# --- 3. problems, each one line with its fix ----------------------------------------------------------------

SMOL = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
        "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
        "mlp.down_proj": (576, 1536)}
SHAPES = {f"model.layers.{i}.{k}": v for i in range(30) for k, v in SMOL.items()}  # SmolLM2-135M's Linears


def one(lines: list[str], *needles: str) -> str:
    """The single problem line that holds every needle."""
    hits = [x for x in lines if all(n in x for n in needles)]
    assert len(hits) == 1, lines
    assert "\n" not in hits[0] and "fix: " in hits[0]
    return hits[0]


def plan_of(rec: recipe.Recipe, shapes: dict[str, tuple[int, int]] = SHAPES) -> Plan:
    """The recipe's base plan (what the uniform allocator starts from), before any calibration."""
    return Plan({n: s for n in shapes if (s := rec.layer_spec(n)) is not None})


def test_smollm2_g128_is_refused_with_the_group_sizes_that_divide() -> None:
    lines = ct.problems(plan_of(recipe.load("gptq-4bit")), SHAPES)
    line = one(lines, "group_size=128 does not divide in_features=576")
    assert line.startswith("model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, ")
    assert "and 177 more" in line  # 6 Linears x 30 blocks; down_proj (K=1536) divides
    assert line.endswith("fix: weights.group_size=64 or 192, or -1 (per channel)")
    assert len(lines) == 1
    assert ct.problems(plan_of(recipe.load("gptq-4bit", ["weights.group_size=64"])), SHAPES) == []


def test_kinds_compressed_tensors_cannot_hold() -> None:
    shapes = {"a.q_proj": (64, 96), "b.x": (64, 96), "c.x": (64, 96), "d.x": (64, 96)}
    plan = Plan({"a.q_proj": LayerSpec(bits=1, binary=True, group_size=-1),
                 "b.x": LayerSpec(bits=3, group_size=-1, levels=(8,) * 96),
                 "c.x": LayerSpec(bits=4, group_size=32, sparsity=0.5),
                 "d.x": LayerSpec(bits=(2, 3, 4), group_size=32)})
    lines = ct.problems(plan, shapes)
    assert "use a quantized recipe" in one(lines, "a.q_proj:", "binary")
    assert "granularity=layer with tie: true" in one(lines, "b.x:", "per-column level counts")
    assert "weights.sparsity=0" in one(lines, "c.x:", "pruned")
    assert "granularity=layer with tie: true" in one(lines, "d.x:", "widths differ between the groups")


def test_fused_shards_with_different_schemes() -> None:
    base = {n: LayerSpec(bits=4, group_size=64, symmetric=True) for n in SHAPES}
    base["model.layers.3.self_attn.k_proj"] = LayerSpec(bits=3, group_size=64, symmetric=True)
    base["model.layers.5.mlp.up_proj"] = LayerSpec(bits=4, group_size=64, symmetric=False)
    del base["model.layers.7.self_attn.q_proj"]  # left dense (an override with skip: true)
    lines = ct.problems(Plan(base), SHAPES)
    line = one(lines, "model.layers.3.self_attn.q_proj/k_proj/v_proj", "qkv_proj")
    assert "k_proj w3 g64 sym" in line and "tie: true" in line
    assert "model.layers.5.mlp.gate_proj/up_proj" in line and "model.layers.7.self_attn.q_proj/k_proj/v_proj" in line
    assert "q_proj dense" in ct.problems(Plan({k: v for k, v in base.items() if "layers.3." not in k
                                               and "layers.5." not in k}), SHAPES)[0]


@pytest.mark.parametrize(("name", "edits", "needles", "fix"), [
    ("baq-3bit", [], ["granularity=group", "one width per Linear"], "granularity=layer with tie: true"),
    ("baq-3bit-faithful", [], ["granularity=column"], "granularity=layer with tie: true"),
    ("baq-3bit", ["allocate.granularity=layer"], ["granularity=layer", "fuses"], "allocate.tie=true"),
    ("evopress-3bit", [], ["evopress with tie: false"], "allocate.tie=true"),
    ("pbllm-10", ["weights.group_size=64"], ["binary"], "use a quantized recipe"),
    ("iss-p-50-w4", ["weights.group_size=64"], ["pruned"], "weights.sparsity=0"),
])
def test_a_recipe_is_checked_before_calibration(name: str, edits: list[str], needles: list[str], fix: str) -> None:
    rec = recipe.load(name, edits)
    assert fix in one(ct.problems(plan_of(rec), SHAPES, rec), *needles)


def test_legal_recipes_have_no_problems() -> None:
    for name, edits in [("evopress-3bit", ["allocate.tie=true", "weights.group_size=64"]),
                        ("gptq-2bit", []), ("rtn-3bit", ["weights.group_size=-1"])]:
        rec = recipe.load(name, edits)
        assert ct.problems(plan_of(rec), SHAPES, rec) == [], name


def test_dtype_problems() -> None:
    plan = Plan({"a": LayerSpec(scale_dtype="float16"), "b": LayerSpec(scale_dtype="bfloat16")})
    assert ct.dtype_problems(plan, torch.float32) == []
    assert "a: float16 scales are rounded to bfloat16" in one(ct.dtype_problems(plan, torch.bfloat16), "a:")
    assert ct.dtype_problems(plan, torch.float16) == []  # bf16 scales fit in fp16 (checked per value at write)
