"""GGUF export: a gguf-* recipe's model.gguf, read back by the `gguf` package (an independent reader and decoder),
holds exactly our layers, the metadata and tokenizer llama.cpp requires, and llama.cpp's type mix; what GGUF
cannot hold is refused before calibration."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import SMALL, cli, one_line_error, tiny_llama

import compress
from compress import checkpoint, mix, recipe
from compress.errors import CompressError
from compress.export import gguf as gguf_export
from compress.nn import CompressedLinear
from compress.plan import LayerSpec, Plan

# hidden 256 and intermediate 512: the k-quants fit (rows of 256); 4 layers so the Q4_K_M mix differs by layer
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
REQUIRED = ["general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
            "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
            "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
            "general.file_type", "general.quantization_version", "tokenizer.ggml.model", "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
            "tokenizer.ggml.eos_token_id"]


def compressed(name: str, **kw: object) -> compress.Result:
    model = tiny_llama(**{**SHAPE, **kw})
    return compress.compress(model, None, recipe.load(name, SMALL))


def unpermute(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved rotary rows back to transformers' halves (the inverse of the export's permutation)."""
    N = x.shape[0]
    return x.reshape(n_head, N // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def read(path: Path) -> tuple[gguf.GGUFReader, dict[str, gguf.ReaderTensor]]:
    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def decoded(t: gguf.ReaderTensor) -> torch.Tensor:
    """A tensor as the gguf package decodes it, [N, K]."""
    x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return torch.from_numpy(np.array(x, dtype=np.float32)).reshape(*reversed([int(d) for d in t.shape]))


@pytest.fixture(scope="module")
def q4km(tmp_path_factory: pytest.TempPathFactory, tokenizer: object) -> tuple[compress.Result, Path]:
    res = compressed("gguf-q4_k_m")
    out = tmp_path_factory.mktemp("gguf")
    gguf_export.write(res.model, tokenizer, res.plan, out, dtype=torch.float32, recipe=res.recipe)
    return res, out / "model.gguf"


def test_every_layer_decodes_to_ours(q4km: tuple[compress.Result, Path]) -> None:
    res, path = q4km
    _, tensors = read(path)
    cfg = res.model.config
    for name, m in res.model.named_modules():
        if not isinstance(m, CompressedLinear):
            continue
        gname = mix.gguf_name(f"{name}.weight", "llama", cfg.num_hidden_layers)
        t = tensors[gname]
        assert t.tensor_type.name.lower() == m.spec.ggml
        theirs = decoded(t)
        if ".attn_q." in gname or ".attn_k." in gname:
            theirs = unpermute(theirs, cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads)
        assert torch.equal(theirs, m.dequantize()), gname


def test_metadata_and_tokenizer(q4km: tuple[compress.Result, Path], tokenizer: object) -> None:
    res, path = q4km
    r, tensors = read(path)
    for key in REQUIRED:
        assert key in r.fields, key
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert r.fields["llama.block_count"].contents() == 4
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    vocab = tokenizer.get_vocab()
    assert len(tokens) == res.model.config.vocab_size
    assert all(tokens[i] == t for t, i in vocab.items())
    eos = r.fields["tokenizer.ggml.eos_token_id"].contents()
    assert tokens[eos] == "<eos>" and r.fields["tokenizer.ggml.token_type"].contents()[eos] == gguf.TokenType.CONTROL
    assert len(r.fields["tokenizer.ggml.merges"].contents()) > 0
    # tied embeddings: one token_embd at the output's type, no output.weight; norms in f32
    assert "output.weight" not in tensors
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q6_K
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    emb = res.model.get_input_embeddings().weight.detach().float()
    err = decoded(tensors["token_embd.weight"]) - emb
    assert 10 * torch.log10(emb.pow(2).sum() / err.pow(2).sum()) > 25  # Q6_K: SQNR ~30 dB on random weights


def test_q4_k_m_mix_is_llama_cpps(q4km: tuple[compress.Result, Path]) -> None:
    _, path = q4km
    _, tensors = read(path)
    got = {n: t.tensor_type.name for n, t in tensors.items() if n.startswith("blk.")}
    n = 4  # more bits: i < n/8 (none), i >= 7n/8 (layer 3), (i - n/8) % 3 == 2 (layer 2)
    for i in range(n):
        extra = "Q6_K" if i in (2, 3) else "Q4_K"
        assert got[f"blk.{i}.attn_v.weight"] == extra and got[f"blk.{i}.ffn_down.weight"] == extra
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert got[f"blk.{i}.{t}.weight"] == "Q4_K"


def test_rows_that_do_not_fit_fall_back_as_llama_cpp_does() -> None:
    """hidden 96: no row of q, k, v, o, gate or up fits a 256-block, so Q4_K falls back to Q5_0 and Q6_K to Q8_0
    (llama.cpp's tensor_type_fallback); ffn_down (rows of 512) keeps the k-quants."""
    res = compressed("gguf-q4_k_m", hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    types = {n.rsplit(".", 1)[-1] + f"@{n.split('.')[2]}": s.ggml for n, s in res.plan.layers.items()}
    assert types["q_proj@0"] == "q5_0" and types["v_proj@3"] == "q8_0" and types["down_proj@0"] == "q4_k"
    assert mix.fitted("q2_k", 96) == gguf_export.ggml.FALLBACK["q2_k"]


def test_plan_refusals_name_the_fix(tmp_path: Path) -> None:
    shapes = {"model.layers.0.mlp.up_proj": (512, 256)}
    asym = Plan({"model.layers.0.mlp.up_proj": LayerSpec(bits=4, group_size=128)})
    (line,) = gguf_export.problems(asym, shapes)
    assert "not a ggml type" in line and "gguf-q4_k_m" in line
    exact = Plan({"model.layers.0.mlp.up_proj": LayerSpec(bits=4, group_size=32, symmetric=True)})
    assert gguf_export.problems(exact, shapes) == []  # symmetric g32 fp16 is q4_0 exactly
    odd = Plan({"model.layers.0.mlp.up_proj": LayerSpec(bits=4, group_size=32, ggml="q4_k")})
    (line,) = gguf_export.problems(odd, {"model.layers.0.mlp.up_proj": (512, 96)})
    assert "multiple of 256" in line and "q5_0" in line
    with pytest.raises(CompressError, match=r"no llama\.cpp architecture"):
        gguf_export.check_config(type("Cfg", (), {"model_type": "gpt_neox"})())


def test_affine_q4_0_grid_is_written_exactly(tmp_path: Path, tokenizer: object) -> None:
    """An affine checkpoint whose grid is a ggml type (symmetric 4-bit, groups of 32, float16 scales) exports
    through `compress export --format gguf` without re-rounding."""
    res = compress.compress(tiny_llama(**SHAPE), None, recipe.load("gptq-4bit", [*SMALL, "weights.symmetric=true"]))
    ck = tmp_path / "ck"
    checkpoint.save(res.model, tokenizer, res.plan, res.recipe, ck, card="test")
    from compress import export

    export.export(ck, "gguf", tmp_path / "out")
    _, tensors = read(tmp_path / "out" / "model.gguf")
    m = res.model.get_submodule("model.layers.1.mlp.down_proj")
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert torch.equal(decoded(t), m.dequantize())


def test_dense_gguf_holds_the_weights(tmp_path: Path, tokenizer: object) -> None:
    model = tiny_llama(**SHAPE)
    gguf_export.write_dense(model, tokenizer, tmp_path, dtype=torch.bfloat16)
    r, tensors = read(tmp_path / "model.gguf")
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_BF16)
    w = model.get_submodule("model.layers.0.mlp.up_proj").weight.detach()
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert torch.equal(decoded(tensors["blk.0.ffn_up.weight"]), w.to(torch.bfloat16).float())
    q = model.get_submodule("model.layers.0.self_attn.q_proj").weight.detach()
    assert torch.equal(unpermute(decoded(tensors["blk.0.attn_q.weight"]), 4), q.to(torch.bfloat16).float())


def test_unknown_architecture_refused_before_calibration(tmp_path: Path, tokenizer: object,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import tiny_opt

    d = tmp_path / "opt"
    tiny_opt().save_pretrained(d)
    tokenizer.save_pretrained(d)
    code, _, err = cli([str(d), "--recipe", "gguf-q4_k_m", "--out", str(tmp_path / "o"), "--eval-windows", "0"],
                       capsys)
    assert code != 0
    line = one_line_error(err)
    assert "opt" in line and "llama.cpp architecture" in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_type_the_rows_cannot_hold_is_refused_before_calibration(tmp_path: Path, tiny_llama_dir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """(the tiny Llama's hidden size 64: no row fits a 256-block)"""
    code, _, err = cli([str(tiny_llama_dir), "--recipe", "gptq-4bit", "--set", "weights.ggml=q4_k", "--out",
                        str(tmp_path / "o"), "--eval-windows", "0"], capsys)
    line = one_line_error(err)
    assert code != 0 and "q4_k" in line and "multiple of 256" in line and "q5_0" in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_ggml_checkpoint_reloads_exactly(q4km: tuple[compress.Result, Path], tmp_path: Path,
                                           tokenizer: object) -> None:
    """The compress checkpoint of a gguf-* recipe holds ggml's bytes; from_pretrained gives the same logits."""
    from helpers import logits
    from transformers import AutoModelForCausalLM

    res, _ = q4km
    checkpoint.save(res.model, tokenizer, res.plan, res.recipe, tmp_path, card="test")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(loaded), logits(res.model))
    assert checkpoint.inspect(tmp_path).plan.layers == res.plan.layers
