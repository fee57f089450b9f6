"""End to end on tiny random models: compress -> save -> load, resume, architectures, dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import logits, run, tiny_llama, tiny_opt

import compress
from compress import checkpoint
from compress.nn import CompressedLinear
from compress.sequential import BlockReport
from compress.workdir import WorkDir


@pytest.mark.parametrize("name", ["rtn-4bit", "gptq-4bit", "gptq-3bit", "gptq-2bit"])
def test_saved_checkpoint_loads_with_identical_logits(name: str, tmp_path: Path) -> None:
    m = tiny_llama()
    res = run(m, name)
    expected = logits(m)
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path, card="card")
    loaded = compress.load(tmp_path)
    layers = [mod for mod in loaded.modules() if isinstance(mod, CompressedLinear)]
    assert len(layers) == len(res.plan) == 14
    assert torch.equal(logits(loaded), expected)


def test_from_pretrained_after_import_returns_packed_linears(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    m = tiny_llama()
    res = run(m)
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path, card="card")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, CompressedLinear)
    assert q.qweight.dtype == torch.int32 and q.scale.dtype == torch.float16
    assert torch.equal(logits(loaded), logits(m))


def test_compressed_model_stays_close_to_dense_and_4bit_beats_2bit() -> None:
    dense = logits(tiny_llama())
    err = {}
    for name in ("gptq-4bit", "gptq-2bit"):
        m = tiny_llama()
        run(m, name)
        err[name] = float((logits(m) - dense).pow(2).mean() / dense.pow(2).mean())
    assert err["gptq-4bit"] < 0.05
    assert err["gptq-4bit"] < err["gptq-2bit"]


def test_gptq_output_error_is_below_rtn() -> None:
    """On calibration-like inputs GPTQ must reconstruct block outputs better than RTN."""
    dense = logits(tiny_llama())
    err = {}
    for name in ("rtn-3bit", "gptq-3bit"):
        m = tiny_llama()
        run(m, name, ("calibrate.samples=32",))
        err[name] = float((logits(m) - dense).pow(2).mean())
    assert err["gptq-3bit"] < err["rtn-3bit"]


def test_overrides_pick_bits_and_skip_layers() -> None:
    m = tiny_llama()
    res = run(m, edits=("overrides=[{match: '*.mlp.down_proj', bits: 8}, {match: 'model.layers.0.*', skip: true}]",))
    assert "model.layers.0.self_attn.q_proj" not in res.plan
    assert isinstance(m.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert res.plan["model.layers.1.mlp.down_proj"].bits == 8
    assert res.plan["model.layers.1.mlp.up_proj"].bits == 4


@pytest.mark.parametrize("true_sequential", [False, True])
def test_opt_architecture(true_sequential: bool, tmp_path: Path) -> None:
    m = tiny_opt()
    res = run(m, edits=(f"calibrate.true_sequential={str(true_sequential).lower()}",))
    assert len(res.plan) == 12  # q, k, v, out_proj, fc1, fc2 per block
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path, card="card")
    assert torch.equal(logits(compress.load(tmp_path)), logits(m))


def test_bfloat16_model_stays_bfloat16_and_scales_stay_float16(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "dense")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16)  # as hub models load
    res = run(m)
    assert m.model.layers[1].input_layernorm.weight.dtype == torch.bfloat16
    q = m.model.layers[1].self_attn.q_proj
    assert q.scale.dtype == torch.float16
    scale = q.scale.clone()
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path / "out", card="card")
    loaded = compress.load(tmp_path / "out")
    assert torch.equal(loaded.model.layers[1].self_attn.q_proj.scale, scale)
    assert torch.equal(logits(loaded), logits(m))
    q.to(torch.float32).to(torch.bfloat16)  # model-wide casts must never round the stored scales
    assert torch.equal(q.scale, scale)


@pytest.mark.parametrize("name", ["gptq-4bit", "pbllm-10"])  # PB-LLM: buffers sized by the rounding
def test_interrupted_run_resumes_to_the_same_model(name: str, tmp_path: Path) -> None:
    fingerprint = {"test": 1}
    expected = tiny_llama()
    run(expected, name)

    def stop_after_first_block(rep: BlockReport) -> None:
        if rep.index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama(), name, workdir=WorkDir(tmp_path, fingerprint), progress=stop_after_first_block)
    work = WorkDir(tmp_path, fingerprint)
    assert work.finished == 1
    seen = []
    resumed = tiny_llama()
    run(resumed, name, workdir=work, progress=seen.append)
    assert [r.resumed for r in seen] == [True, False]
    assert torch.equal(logits(resumed), logits(expected))


def test_workdir_from_another_command_is_discarded(tmp_path: Path) -> None:
    run(tiny_llama(), workdir=WorkDir(tmp_path, {"recipe": "a"}))
    assert WorkDir(tmp_path, {"recipe": "a"}).finished == 2
    assert WorkDir(tmp_path, {"recipe": "b"}).finished == 0


def test_large_checkpoints_are_sharded_and_load(tmp_path: Path) -> None:
    m = tiny_llama()
    res = run(m)
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path, card="card", max_shard_size="60KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert torch.equal(logits(compress.load(tmp_path)), logits(m))


def test_nan_activations_are_a_clear_error() -> None:
    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(compress.CompressError, match="NaN"):
        run(m)


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    import json

    m = tiny_llama()
    res = run(m, "rtn-4bit")
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path, card="card")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(compress.CompressError, match="upgrade compress"):
        compress.load(tmp_path)


def test_block_passes_build_no_autograd_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward with grad enabled would keep every block's activations alive (gigabytes on a real model)."""
    from compress import sequential

    real = sequential._run_block
    seen = []

    def spy(*a, **kw):
        seen.append(torch.is_grad_enabled())
        return real(*a, **kw)

    monkeypatch.setattr(sequential, "_run_block", spy)
    run(tiny_llama())
    assert seen and not any(seen)
