"""Any decoder transformers builds compresses without a table entry (issue 19): tiny random models of thirteen
families, GPTQ with true-sequential order found from the model, saved, reloaded with from_pretrained (logits
equal to the in-memory model, bit for bit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import IDS, SMALL, VOCAB, logits
from transformers import AutoConfig, AutoModelForCausalLM

import compress
from compress import checkpoint, models, recipe

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES: dict[str, dict] = {  # model_type -> config edits (what the family needs at this size)
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 16}, "gemma2": {"head_dim": 16},
    # sliding-window and global layers mixed, each with its own rotary table and mask
    "gemma3_text": {"head_dim": 16, "sliding_window": 4, "num_hidden_layers": 3, "sliding_window_pattern": 2},
    "phi3": {}, "olmo2": {}, "granite": {}, "gpt_neox": {}, "opt": {"ffn_dim": 96, "word_embed_proj_dim": 64},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
}
SEQUENTIAL = {  # what the traced call order must find (model_type -> groups of block 0)
    "llama": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    "phi3": (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    "gpt_neox": (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                 ("mlp.dense_4h_to_h",)),
}


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type]})
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_the_traced_order_matches_the_hand_written_table() -> None:
    m = tiny("llama")
    assert models.discover(m) == models.ARCHS["llama"]


@pytest.mark.parametrize("model_type", sorted(SEQUENTIAL))
def test_true_sequential_groups_are_found_from_the_model(model_type: str) -> None:
    assert models.discover(tiny(model_type)).sequential == SEQUENTIAL[model_type]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gptq_compresses_saves_and_reloads_exactly(model_type: str, tmp_path: Path) -> None:
    m = tiny(model_type)
    result = compress.compress(m, None, recipe.load("gptq-4bit", [*SMALL, "calibrate.true_sequential=true"]))
    linears = [n for n, x in models.blocks_of(m, models.arch_of(m)).named_modules()
               if isinstance(x, torch.nn.Linear | compress.CompressedLinear)]
    assert len(result.plan) == len(linears) > 0  # every Linear of every block is packed
    assert all(isinstance(m.get_submodule(n), compress.CompressedLinear) for n in result.plan)
    checkpoint.save(m, None, result.plan, recipe.load("gptq-4bit"), tmp_path, card="test")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(loaded), logits(m))
    assert logits(m).shape == (*IDS.shape, VOCAB)


def test_per_layer_arguments_reach_each_block() -> None:
    """Gemma 3 hands global layers another rotary table and mask than sliding ones: calibration must run each
    block with its own, so a block's captured call equals what the model passes it in a real forward."""
    from compress.sequential import capture_inputs

    m = tiny("gemma3_text")
    arch = models.arch_of(m)
    seen: list[dict] = []
    hooks = [b.register_forward_pre_hook(lambda _m, a, kw: seen.append(kw), with_kwargs=True)
             for b in models.blocks_of(m, arch)]
    ids = IDS[:1, :16]
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    cap = capture_inputs(m, arch, ids, 1, torch.device("cpu"))
    kinds = m.config.layer_types
    assert len(set(kinds)) == 2
    for i, kw in enumerate(seen):
        cos, _ = cap.calls[i][0][1]["position_embeddings"]
        assert torch.equal(cos, kw["position_embeddings"][0]), f"block {i} ({kinds[i]})"
    g, s = kinds.index("full_attention"), kinds.index("sliding_attention")
    assert not torch.equal(cap.calls[g][0][1]["position_embeddings"][0], cap.calls[s][0][1]["position_embeddings"][0])


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_fused_experts_unfuse_to_the_same_logits(model_type: str) -> None:
    from compress import moe

    m = tiny(model_type)
    before = logits(m)
    assert moe.fused_experts(m) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert moe.unfuse_experts(m) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert torch.equal(logits(m), before) and moe.fused_experts(m) == []


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_every_expert_is_calibrated_on_its_tokens_and_packed(model_type: str) -> None:
    m = tiny(model_type)
    n_experts = 4
    result = compress.compress(m, None, recipe.load("gptq-4bit", [*SMALL, "calibrate.true_sequential=true"]))
    experts = [n for n in result.plan if ".experts." in n]
    assert len(experts) == 2 * 2 * n_experts  # gate_up and down of every expert of both blocks
    assert models.arch_of(m).sequential[2:] == (  # one calibration pass per role, not per expert
        tuple(f"mlp.experts.{e}.gate_up_proj" for e in range(n_experts)),
        tuple(f"mlp.experts.{e}.down_proj" for e in range(n_experts)))
    assert not any(".gate." in n for n in result.plan)  # the router stays dense


def test_experts_that_see_few_tokens_take_the_pooled_hessian_and_say_so() -> None:
    m = tiny("mixtral")
    edits = [*SMALL, "calibrate.samples=1", "calibrate.seqlen=16", "calibrate.batch_size=1"]
    result = compress.compress(m, None, recipe.load("gptq-4bit", edits))  # 16 tokens × top-2 over 4 experts
    notes = {r.name: r.info.get("hessian") for b in result.blocks for r in b.layers if ".experts." in r.name}
    assert notes and all(v is not None and v.startswith("pooled Hessian of 4 experts") for v in notes.values())
    assert all(r.info.get("hessian") is None for b in result.blocks for r in b.layers if ".experts." not in r.name)


def test_no_token_for_any_expert_is_one_line() -> None:
    from compress.errors import CompressError
    from compress.sequential import Hessian, pool_rare_experts

    hs = {f"model.layers.0.mlp.experts.{e}.down_proj": Hessian(8, torch.device("cpu")) for e in range(3)}
    with pytest.raises(CompressError, match=r"no calibration token was routed to any expert of .*experts\.\*\.down"):
        pool_rare_experts(hs)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_exports_refuse_expert_linears_before_calibration(fmt: str) -> None:
    from compress import export
    from compress.errors import CompressError
    from compress.pipeline import make_plan

    m = tiny("mixtral")
    compress.moe.unfuse_experts(m)
    plan = make_plan(m, models.arch_of(m), recipe.load("gptq-4bit", ["weights.group_size=32"]))
    shapes = {n: tuple(m.get_submodule(n).weight.shape) for n in plan}
    with pytest.raises(CompressError, match=r"mixture-of-experts Linears .* skip the experts"):
        export.check(fmt, plan, shapes)
