"""Models of any size (issue 19): read block by block from the safetensors shards (compress/lazy.py), the run writes
the same checkpoint as the whole-model path, tensor for tensor; it resumes after an interruption, shards its
output, and refuses in one line what needs the whole model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FAST, cli, logits, one_line_error, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import compress
from compress import checkpoint, lazy, models, verify


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in verify.weight_files(d) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-block tiny Llama stored in bfloat16, sharded into several files (as hub models are)."""
    d = tmp_path_factory.mktemp("bf16")
    m = tiny_llama(num_hidden_layers=3).to(torch.bfloat16)
    m.save_pretrained(d, max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(d)
    assert (d / "model.safetensors.index.json").is_file()
    return d


def _run(src: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    code, _, err = cli([str(src), "--recipe", "gptq-4bit", "--out", str(out), *FAST, *extra], capsys)
    assert code == 0, err
    return err


def test_open_lazy_keeps_the_blocks_on_meta_and_the_rest_real(bf16_dir: Path) -> None:
    m, _, src = lazy.open_lazy(models.resolve(str(bf16_dir)))
    blocks = models.blocks_of(m, src.arch)
    assert all(p.is_meta for p in blocks.parameters())
    outside = [t for n, t in [*m.named_parameters(), *m.named_buffers()] if not n.startswith("model.layers.")]
    assert outside and not any(t.is_meta for t in outside)
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied again
    whole = AutoModelForCausalLM.from_pretrained(bf16_dir)
    src.fetch(1)
    for (n, a), (_, b) in zip(blocks[1].state_dict().items(), whole.model.layers[1].state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    src.release(1)
    assert all(p.is_meta for p in blocks[1].parameters())
    assert torch.equal(m.model.rotary_emb.inv_freq, whole.model.rotary_emb.inv_freq)


def test_streamed_run_writes_the_whole_model_runs_checkpoint(bf16_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    _run(bf16_dir, tmp_path / "whole", capsys, "--stream", "off")
    err = _run(bf16_dir, tmp_path / "streamed", capsys, "--stream", "on")
    assert "block by block" in err
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    qc = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    assert {"calibrate", "round"} <= set(qc["stages"]) and qc["stages"]["round"]["peak_rss_mb"] > 0
    loaded = compress.load(tmp_path / "streamed")
    assert torch.equal(logits(loaded), logits(compress.load(tmp_path / "whole")))


@pytest.mark.parametrize("model_type", ["gpt_neox", "gemma3_text"])
def test_other_families_stream_to_the_same_checkpoint(model_type: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """GPT-NeoX's lm_head is `embed_out` on disk; Gemma 3 mixes sliding and global layers (no ARCHS entry:
    the order is traced on a block fetched from disk)."""
    from test_families import COMMON, FAMILIES

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type]})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    _run(tmp_path / "src", tmp_path / "whole", capsys, "--stream", "off", "--set", "calibrate.true_sequential=true")
    _run(tmp_path / "src", tmp_path / "streamed", capsys, "--stream", "on", "--set", "calibrate.true_sequential=true")
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_streamed_run_resumes_after_ctrl_c(bf16_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from compress import pipeline

    real = pipeline.compress

    def interrupted(*args: object, progress: object = None, **kw: object) -> object:
        def stop(rep: object) -> None:
            progress(rep)
            if rep.index == 1:
                raise KeyboardInterrupt

        return real(*args, progress=stop, **kw)

    monkeypatch.setattr(pipeline, "compress", interrupted)
    out = tmp_path / "out"
    code, _, err = cli([str(bf16_dir), "--recipe", "gptq-4bit", "--out", str(out), *FAST, "--stream", "on"], capsys)
    assert code == 130
    assert len(list((out / ".partial").glob("block_*.safetensors"))) == 2
    monkeypatch.setattr(pipeline, "compress", real)
    err = _run(bf16_dir, out, capsys, "--stream", "on")
    assert "resuming: 2 finished blocks" in err
    _run(bf16_dir, tmp_path / "straight", capsys, "--stream", "on")
    a, b = _tensors(out), _tensors(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_streamed_checkpoint_is_sharded_when_large(bf16_dir: Path, tmp_path: Path) -> None:
    from compress import recipe
    from compress.pipeline import compress as run
    from compress.workdir import WorkDir

    m, tok, src = lazy.open_lazy(models.resolve(str(bf16_dir)))
    rec = recipe.load("gptq-4bit", ["calibrate.dataset=random", "calibrate.samples=4", "calibrate.seqlen=32",
                                    "weights.group_size=32"])
    work = WorkDir(tmp_path / "out", {"test": 1})
    result = run(m, tok, rec, workdir=work, source=src)
    checkpoint.save_streamed(m, tok, result.plan, rec, tmp_path / "out", card="test", blocks="model.layers",
                             block_state=work.load_block, n_blocks=3, shard_bytes=40_000)
    assert len(verify.weight_files(tmp_path / "out")) > 2
    loaded = compress.load(tmp_path / "out")
    assert isinstance(loaded.model.layers[2].mlp.down_proj, compress.CompressedLinear)
    checkpoint.inspect(tmp_path / "out")


def test_what_needs_the_whole_model_is_refused_before_loading(bf16_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli([str(bf16_dir), "--recipe", "baq-3bit", "--out", str(tmp_path / "x"), "--stream", "on"],
                       capsys)
    assert code == 2 and "needs the whole model in memory (allocate.method=baq)" in one_line_error(err)
    assert not (tmp_path / "x").exists()


def test_auto_streams_only_what_would_not_fit(bf16_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = models.resolve(str(bf16_dir))
    need = lazy.whole_model_bytes(ref)
    assert need == sum(f.stat().st_size for f in bf16_dir.glob("*.safetensors"))
    assert lazy.whole_model_bytes(ref, torch.float32) == 2 * need
    assert not lazy.should_stream(ref, "auto", "auto")
    monkeypatch.setattr(lazy, "available_memory", lambda: need)
    assert lazy.should_stream(ref, "auto", "auto") and not lazy.should_stream(ref, "auto", "off")


def test_a_damaged_block_is_named_when_it_is_read(bf16_dir: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    from compress.errors import CompressError

    d = Path(shutil.copytree(bf16_dir, tmp_path / "nan"))
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.2.mlp.up_proj.weight"
    f = d / index[key]
    sd = load_file(f)
    sd[key][3, 3] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    _, _, src = lazy.open_lazy(models.resolve(str(d)))
    src.fetch(1)
    with pytest.raises(CompressError, match=r"\(model\.layers\.2\): mlp\.up_proj\.weight holds 1 NaN/Inf"):
        src.fetch(2)


def test_hidden_states_beyond_the_budget_spill_to_disk_and_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import run

    from compress import sequential

    spilled: list[int] = []
    real = sequential.Spill.append

    def counting(self: sequential.Spill, t: torch.Tensor) -> None:
        real(self, t)
        spilled.append(isinstance(self.items[-1], Path))

    monkeypatch.setattr(sequential.Spill, "append", counting)
    a, b = tiny_llama(num_hidden_layers=3), tiny_llama(num_hidden_layers=3)
    run(a, edits=("calibrate.batch_size=2",))
    run(b, edits=("calibrate.batch_size=2", "calibrate.max_memory=0.00002"))  # 20 kB: one 16 kB batch in memory
    assert any(spilled) and not all(spilled)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
