"""PB-LLM: salience, the closed-form binary parameters, GPTQ-PB ≤ no feedback, the packed format (bitmask and
CSR), honest bits per weight, and checkpoints that load to the in-memory logits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import hessian, logits, run, tiny_llama, weight

import compress
from compress import checkpoint
from compress import format as fmt
from compress.errors import CompressError
from compress.nn import CompressedLinear
from compress.plan import LayerSpec, LayerWeight
from compress.round import gptq, pbllm
from compress.round.loss import layer_loss


def test_alpha_is_the_least_squares_scale_for_fixed_signs() -> None:
    W = weight()
    mu, alpha = pbllm.binary_params(W, torch.ones_like(W, dtype=torch.bool), W.shape[1], torch.float32)
    b = torch.sign(W - mu)
    for a in (alpha * 0.97, alpha * 1.03):  # J(α) = ‖(w - μ) - α b‖² is minimal at α = mean|w - μ|
        assert ((W - mu - alpha * b) ** 2).sum() < ((W - mu - a * b) ** 2).sum()


def test_salient_mask_takes_the_top_fraction_of_each_group() -> None:
    score = torch.rand(10, 64)
    mask = pbllm.salient_mask(score, 0.1, 32)
    for g in (slice(0, 32), slice(32, 64)):
        assert int(mask[:, g].sum()) == 32
        assert score[:, g][mask[:, g]].min() >= score[:, g][~mask[:, g]].max()


@pytest.mark.parametrize("salient", [0.0, 0.05, 0.2])
@pytest.mark.parametrize("metric", ["magnitude", "hessian"])
def test_gptq_pb_beats_no_feedback_and_salient_weights_help(salient: float, metric: str) -> None:
    W, H = weight(), hessian(96)
    spec = LayerSpec(bits=1, group_size=-1, binary=True, salient=salient)
    fb = pbllm.apply(LayerWeight(W, spec), H, pbllm.Config(metric=metric))
    rtn = pbllm.apply(LayerWeight(W, spec), H, pbllm.Config(metric=metric, feedback=False))
    assert layer_loss(W, fb.dequantize(), H) < layer_loss(W, rtn.dequantize(), H)
    assert fb.spec.nnz == round(salient * W.numel())
    plain = pbllm.apply(LayerWeight(W, replace(spec, salient=0.0)), H, pbllm.Config(feedback=False))
    if salient:
        assert layer_loss(W, rtn.dequantize(), H) < layer_loss(W, plain.dequantize(), H)


@pytest.mark.parametrize("salient", [0.02, 0.3])  # a few positions: CSR; many: bitmask
def test_binary_layer_packs_and_decodes_exactly(salient: float) -> None:
    W, H = weight(N=40, K=200), hessian(200)  # K not a multiple of 32
    spec = LayerSpec(bits=1, group_size=64, binary=True, salient=salient)
    lw = pbllm.apply(LayerWeight(W, spec), H, pbllm.Config(metric="hessian"))
    assert lw.spec.index == ("csr" if salient < 0.05 else "bitmask")
    m = CompressedLinear.from_weight(lw, None)
    assert torch.equal(m.dequantize(), lw.dequantize())
    assert sorted(m.state_dict()) == sorted(
        ["qweight", "scale", "mu", "salient_q", "salient_scale", "salient_zero"]
        + (["salient_rowptr", "salient_col"] if lw.spec.index == "csr" else ["salient_mask"]))
    stored = sum(t.numel() * t.element_size() * 8 for t in m.state_dict().values())
    _, total = lw.spec.bits_per_weight(40, 200)
    assert total * W.numel() == pytest.approx(stored, abs=16)  # counted exactly as stored


def test_bits_per_weight_count_signs_index_and_values() -> None:
    N, K, nnz = 1536, 576, round(0.1 * 1536 * 576)
    spec = LayerSpec(bits=1, group_size=-1, binary=True, salient=0.1, nnz=nnz, index=fmt.choose_index(N, K, nnz))
    code, total = spec.bits_per_weight(N, K)
    assert spec.index == "bitmask"
    assert code == pytest.approx(1 + 1 + 0.8, abs=1e-3)  # never PB-LLM's "1.7 bits"
    assert total == pytest.approx(2.8 + (16 + 16 + 16 + 8) / K, abs=1e-3)


def test_quantizers_refuse_binary_layers() -> None:
    spec = LayerSpec(bits=1, binary=True, salient=0.1)
    with pytest.raises(CompressError, match=r"round\.method=pbllm"):
        gptq.apply(LayerWeight(weight(), spec), hessian(96), gptq.Config())
    with pytest.raises(CompressError, match="binary: true"):
        LayerSpec(bits=2, salient=0.1)


def assert_saved_exactly(m: torch.nn.Module, res: compress.Result, path: Path) -> None:
    """Save -> load gives the in-memory logits, and the compressed Linears' bytes on disk are the reported bits."""
    checkpoint.save(m, None, res.plan, res.recipe, path, card="card")
    assert torch.equal(logits(compress.load(path)), logits(m))
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() * 8 for k in f.keys()  # noqa: SIM118
                     if any(k.startswith(n + ".") and not k.endswith(".bias") for n in res.plan))
    _, total = res.avg_bits()
    assert stored == pytest.approx(total * sum(a * b for a, b in res.shapes.values()), rel=1e-9)


def test_binarized_checkpoint_loads_with_identical_logits_and_its_size_matches(tmp_path: Path) -> None:
    m = tiny_llama()
    res = run(m, "pbllm-10", ("overrides=[{match: '*.down_proj', binary: false, bits: 4}]",))
    specs = res.plan.layers
    assert specs["model.layers.0.mlp.down_proj"].bits == 4 and not specs["model.layers.0.mlp.down_proj"].binary
    assert specs["model.layers.0.mlp.up_proj"].binary and specs["model.layers.0.mlp.up_proj"].nnz > 0
    assert_saved_exactly(m, res, tmp_path)


def clustered_weight(N: int, K: int, flips: float = 0.02, seed: int = 0) -> torch.Tensor:
    """Rows whose signs are noisy copies of a few prototypes (MST-friendly), magnitudes random."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(3, K, generator=g) < 0.5
    signs = protos[torch.randint(0, 3, (N,), generator=g)] ^ (torch.rand(N, K, generator=g) < flips)
    return (signs.float() * 2 - 1) * (0.01 + torch.rand(N, K, generator=g) * 0.02)


@pytest.mark.parametrize(("salient", "index"), [(0.0, ""), (0.05, "csr"), (0.2, "bitmask")])
def test_signs_are_stored_as_an_mst_only_when_smaller_and_decode_exactly(salient: float, index: str) -> None:
    N, K = 64, 512
    spec = LayerSpec(bits=1, group_size=128, binary=True, salient=salient)
    lw = pbllm.apply(LayerWeight(clustered_weight(N, K), spec), hessian(K), pbllm.Config())
    assert lw.spec.signs == "mst" and lw.spec.edges > 0 and lw.info["mst"] == 1.0
    assert (lw.spec.index or "") == index
    m = CompressedLinear.from_weight(lw, None)
    assert m.qweight.numel() == 0 and {"mst_parent", "mst_rowptr", "mst_col"} <= set(m.state_dict())
    assert torch.equal(m.codes(), lw.codes) and torch.equal(m.dequantize(), lw.dequantize())
    stored = sum(t.numel() * t.element_size() * 8 for t in m.state_dict().values())
    code, total = lw.spec.bits_per_weight(N, K)
    assert total * N * K == pytest.approx(stored, abs=16)
    random_signs = pbllm.apply(LayerWeight(weight(N, K), spec), hessian(K), pbllm.Config())
    assert random_signs.spec.signs == "" and random_signs.info["mst"] == 0.0  # the tree would be larger
    plain = pbllm.apply(LayerWeight(clustered_weight(N, K), spec), hessian(K), pbllm.Config(signs="plain"))
    assert plain.spec.signs == "" and torch.equal(plain.dequantize(), lw.dequantize())
    assert code < plain.spec.bits_per_weight(N, K)[0]


def test_an_mst_checkpoint_loads_with_identical_logits_and_its_size_matches(tmp_path: Path) -> None:
    m = tiny_llama(hidden_size=256, intermediate_size=512)
    with torch.no_grad():
        for name, lin in m.named_modules():
            if isinstance(lin, torch.nn.Linear) and name != "lm_head":
                lin.weight.copy_(clustered_weight(*lin.weight.shape, flips=0.005, seed=len(name)))
    res = run(m, "binary", ())
    assert all(s.signs == "mst" for s in res.plan.layers.values())
    assert_saved_exactly(m, res, tmp_path)


def test_pb_llm_is_far_closer_to_dense_than_plain_binarization() -> None:
    dense = logits(tiny_llama())
    err = {}
    for name in ("binary", "pbllm-30"):
        m = tiny_llama()
        run(m, name)
        err[name] = float((logits(m) - dense).norm())
    assert err["pbllm-30"] < 0.5 * err["binary"]


