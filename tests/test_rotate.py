"""Rotations fused into the weights (compress/rotate.py): orthogonal matrices of the model's sizes, the rotated
model's outputs equal the original's (fp64, to rounding), and a rotated checkpoint reloads exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import IDS, SMALL, cli, logits, one_line_error, tiny_llama, tiny_opt
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

import compress
from compress import checkpoint, recipe, rotate
from compress.recipe import Rotate


@pytest.mark.parametrize("n", [2, 12, 16, 64, 96, 192, 576])
def test_hadamard_is_orthogonal_with_entries_of_one_magnitude(n: int) -> None:
    R = rotate.orthogonal(n, "hadamard", seed=3)
    assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(R.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))
    assert torch.equal(R, rotate.orthogonal(n, "hadamard", seed=3))  # seeded
    Q = rotate.orthogonal(n, "random", seed=3)
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_an_order_without_a_construction_is_refused() -> None:
    with pytest.raises(compress.CompressError, match=r"rotate\.method=random"):
        rotate.orthogonal(42, "hadamard", seed=0)  # 42 = 2·21, and 41 = 1 mod 4: neither form built here


def _qwen2() -> torch.nn.Module:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
                                        tie_word_embeddings=True)).eval()


def _qwen3() -> torch.nn.Module:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, head_dim=16,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=384)).eval()


@pytest.mark.parametrize("build", [tiny_llama, _qwen2, _qwen3], ids=["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("cfg", [Rotate("hadamard"), Rotate("random", seed=5), Rotate("hadamard", r2=False),
                                 Rotate("hadamard", r1=False)], ids=["hadamard", "random", "r1", "r2"])
def test_the_rotated_model_is_the_same_model(build: object, cfg: Rotate) -> None:
    model = build().double()
    with torch.no_grad():  # norms with a non-trivial scale, so folding them is exercised
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    before = logits(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    rotated = copy.deepcopy(model)
    facts = rotate.apply(rotated, cfg)
    # fp64 weights and activations; transformers' RMSNorm normalises in float32, so agreement is to fp32 rounding
    assert (torch.max(torch.abs(logits(rotated) - before)) < 1e-6).item()
    if cfg.r1 and tied:
        assert facts["untied_lm_head_params"] == 384 * 64 and not rotated.config.tie_word_embeddings
    emb = rotated.get_input_embeddings().weight
    assert not torch.allclose(emb, model.get_input_embeddings().weight) or not cfg.r1


def test_rotation_spreads_outliers() -> None:
    """What it is for: a weight with one large input channel has a far smaller max/rms once rotated."""
    model = tiny_llama().double()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, 7] *= 30
    W = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    rotate.apply(model, Rotate("hadamard"))
    R = model.model.layers[0].mlp.up_proj.weight.detach()

    def peak(x: torch.Tensor) -> float:
        return float(x.abs().max() / x.pow(2).mean().sqrt())

    assert peak(R) < peak(W) / 2


def test_a_rotated_checkpoint_reloads_exactly(tmp_path: Path, tokenizer: object) -> None:
    res = compress.compress(tiny_llama(), None, recipe.load("gptq-4bit", [*SMALL, "rotate.method=hadamard"]))
    assert res.rotation["untied_lm_head_params"] == 384 * 64
    checkpoint.save(res.model, tokenizer, res.plan, res.recipe, tmp_path, card="test")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(loaded), logits(res.model))


def test_rotation_lowers_the_layer_loss() -> None:
    """On a model with outlier input channels, GPTQ's summed layer loss at 3 bits falls once the model is rotated
    (relative to each Linear's output energy, which rotation leaves unchanged)."""
    model = tiny_llama(hidden_size=64)
    with torch.no_grad():
        for b in model.model.layers:
            b.input_layernorm.weight[[3, 17]] = 20.0  # a few channels 20x the others: the outliers of real LLMs
    plain = compress.compress(copy.deepcopy(model), None, recipe.load("gptq-3bit", SMALL))
    rot = compress.compress(copy.deepcopy(model), None, recipe.load("gptq-3bit", [*SMALL, "rotate.method=hadamard"]))
    assert rot.total_loss < plain.total_loss


def test_an_architecture_it_does_not_cover_is_refused_before_any_work(tmp_path: Path, tokenizer: object,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "opt"
    tiny_opt().save_pretrained(d)
    tokenizer.save_pretrained(d)
    code, _, err = cli([str(d), "--recipe", "gptq-4bit", "--set", "rotate.method=hadamard", "--out",
                        str(tmp_path / "o"), "--eval-windows", "0"], capsys)
    line = one_line_error(err)
    assert code != 0 and "opt" in line and "rotate.method=none" in line
    assert IDS.shape[0] == 2
