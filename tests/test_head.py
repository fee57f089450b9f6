"""weights.lm_head: the output head rounded after the last block on its own inputs (the final norm of the last
rounded block's outputs), stored like any planned Linear, refused where it would be stored twice or where a stage
cannot round it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SMALL, logits, run, tiny_llama
from transformers import AutoModelForCausalLM

import compress
from compress import checkpoint, data, models, pipeline, recipe, rotate, sequential
from compress.export import compressed_tensors, gptq
from compress.nn import CompressedLinear
from compress.reports import BlockReport
from compress.workdir import WorkDir

HEAD = ("rotate.method=hadamard", "weights.lm_head=true")


def test_the_head_inputs_are_what_the_model_hands_its_head() -> None:
    """The stand-in replay (the model's own code after the blocks, fed the last block's outputs) gives the head
    exactly the input a plain forward gives it."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    arch = models.arch_of(model)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        model(ids[:2])
        model(ids[2:])
    hook.remove()
    cap = sequential.capture_inputs(model, arch, ids, 2, torch.device("cpu"))
    hidden = cap.hidden
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            hidden = sequential._run_block(block, hidden, cap.calls[i], torch.device("cpu"), keep=True)
    replayed = [xs[0] for xs in sequential.head_inputs(model, arch, [hidden], ids, 2, torch.device("cpu"))]
    assert len(replayed) == 2
    for got, want in zip(replayed, seen, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert isinstance(model.model.layers[0], torch.nn.Module) and model.model.layers[0].__class__.__name__ != "_Replay"


def test_a_rounded_head_is_packed_counted_and_reloads_exactly(tmp_path: Path, tokenizer: object) -> None:
    dense = tiny_llama()
    res = run(tiny_llama(), "gptq-4bit", HEAD)
    assert isinstance(res.model.lm_head, CompressedLinear) and res.plan.head == "lm_head"
    assert res.shapes["lm_head"] == (384, 64)  # counted in the bits per weight
    head = [b for b in res.blocks if b.stage == "round: output head"]
    assert len(head) == 1 and head[0].layers[0].name == "lm_head" and head[0].loss > 0
    kept = run(tiny_llama(), "gptq-4bit", HEAD[:1])  # the same model with the head dense
    err = (logits(res.model) - logits(dense)).pow(2).mean()
    assert 0 < err < 10 * (logits(kept.model) - logits(dense)).pow(2).mean() + 1e-3
    checkpoint.save(res.model, tokenizer, res.plan, res.recipe, tmp_path, card="test")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.lm_head, CompressedLinear)
    assert torch.equal(logits(loaded), logits(res.model))


def test_gptq_rounds_the_head_with_less_loss_than_rounding_to_nearest() -> None:
    """On the head's own Hessian, GPTQ's error is below RTN's (both measured as tr((W - Q) H (W - Q)^T))."""
    res = run(tiny_llama(), "gptq-3bit", HEAD)
    rtn = run(tiny_llama(), "rtn-3bit", HEAD)
    model = tiny_llama()
    rotate.apply(model, recipe.load("gptq-3bit", [*SMALL, *HEAD]).rotate)
    W = model.lm_head.weight.detach().double()
    arch = models.arch_of(model)
    ids = data.calibration(None, "random", 8, 32, 0, vocab_size=384).ids
    # the head's Hessian on the GPTQ model's final hidden states
    cap = sequential.capture_inputs(res.model, arch, ids, 4, torch.device("cpu"))
    hidden = cap.hidden
    with torch.no_grad():
        for i, block in enumerate(res.model.model.layers):
            hidden = sequential._run_block(block, hidden, cap.calls[i], torch.device("cpu"), keep=True)
    H = sequential.Hessian(64, torch.device("cpu"))
    for xs in sequential.head_inputs(res.model, arch, [hidden], ids, 4, torch.device("cpu")):
        H.add(xs[0])

    def loss(m: torch.nn.Module) -> float:
        E = W - m.lm_head.dequantize().double()  # [N, K]
        return float(torch.einsum("nk,kl,nl->", E, H.H.double(), E))

    assert loss(res.model) < loss(rtn.model)


def test_an_interrupted_run_resumes_to_the_same_head(tmp_path: Path) -> None:
    expected = run(tiny_llama(), "gptq-4bit", HEAD).model

    def stop_after_first_block(rep: BlockReport) -> None:
        if rep.index == 0 and rep.stage == "round":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama(), "gptq-4bit", HEAD, workdir=WorkDir(tmp_path, {"t": 1}), progress=stop_after_first_block)
    seen: list[BlockReport] = []
    resumed = run(tiny_llama(), "gptq-4bit", HEAD, workdir=WorkDir(tmp_path, {"t": 1}), progress=seen.append).model
    assert [(r.stage, r.resumed) for r in seen] == [("round", True), ("round", False), ("round: output head", False)]
    assert torch.equal(resumed.lm_head.qweight, expected.lm_head.qweight)
    assert torch.equal(logits(resumed), logits(expected))


@pytest.mark.parametrize(("name", "edits", "what"), [
    ("gptq-4bit", ("weights.lm_head=true",), "tied to the input embedding"),
    ("discquant-3bit", HEAD, "round.method=discquant"),
    ("evopress-3bit", HEAD, "allocate.method=evopress"),
])
def test_what_cannot_round_the_head_is_refused_before_calibration(name: str, edits: tuple[str, ...], what: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_calibration(*_a: object, **_k: object) -> None:
        raise AssertionError("calibrated before refusing")

    monkeypatch.setattr(pipeline, "calibrate", no_calibration)
    with pytest.raises(compress.CompressError, match=r"weights\.lm_head") as e:
        run(tiny_llama(), name, edits)
    assert what in str(e.value) and "\n" not in str(e.value)


def test_a_streamed_run_refuses_the_head() -> None:
    with pytest.raises(compress.CompressError, match=r"weights\.lm_head"):
        pipeline.check_streamable(recipe.load("gptq-4bit", ["weights.lm_head=true"]))


def test_the_exports_say_what_they_do_with_the_head() -> None:
    res = run(tiny_llama(), "gptq-4bit", (*HEAD, "weights.symmetric=true"))
    shapes = dict(res.shapes)
    lines = compressed_tensors.problems(res.plan, shapes)
    assert len(lines) == 1 and lines[0].startswith("lm_head:") and "weights.lm_head=false" in lines[0]
    assert gptq.problems(res.plan, shapes) == []
    qc = gptq.quantization_config(res.plan, shapes)
    assert qc["lm_head"] is True
    assert gptq.quantization_config(res.plan.without("lm_head"), shapes)["lm_head"] is False
    # transformers' GPTQ loader ignores lm_head: true (measured: it initialises the head at random): the card says so
    text = gptq.card(qc, res.plan, shapes, [], "tiny")
    assert "transformers' GPTQ loader ignores `lm_head: true`" in text and "weights.lm_head=false" in text


def test_a_ggml_head_is_written_as_llama_cpps_output_matrix(tmp_path: Path, tokenizer: object) -> None:
    """gguf-q4_k_m with the head rounded: the mix gives it llama.cpp's own output type (q6_k), and output.weight
    holds our head's codes, as the gguf package decodes them."""
    import gguf
    import numpy as np

    from compress.export import gguf as gguf_export

    model = tiny_llama(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)
    res = compress.compress(model, None, recipe.load("gguf-q4_k_m", [*SMALL, *HEAD]))
    assert res.plan["lm_head"].ggml == "q6_k"
    gguf_export.write(res.model, tokenizer, res.plan, tmp_path, dtype=torch.float32, recipe=res.recipe)
    t = next(t for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors if t.name == "output.weight")
    assert t.tensor_type.name.lower() == "q6_k"
    theirs = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(384, 256)
    assert torch.equal(torch.from_numpy(np.array(theirs, dtype=np.float32)), res.model.lm_head.dequantize())
