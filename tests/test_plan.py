"""`compress plan` (issue 19): what a run would do and take, before it runs; `compress MODEL` refuses a run whose
memory estimate exceeds what the machine has, before any calibration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import FAST, cli, one_line_error, tiny_llama, tiny_tokenizer

from compress import checkpoint, estimate, lazy, models, recipe
from compress.pipeline import make_plan


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bf16")
    tiny_llama(num_hidden_layers=3).to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_plan_prints_the_plan_memory_disk_and_time(bf16_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["plan", str(bf16_dir), "--recipe", "gptq-4bit", "--set", "weights.group_size=32"], capsys)
    assert code == 0, err
    assert "mlp.down_proj" in out and "64 x 160" in out and "21 Linears packed at 4.000 code bits" in out
    assert re.search(r"estimated peak RAM: \d+\.\d+ GB", out)
    assert "checkpoint" in out and "estimated rounding time" in out and "fits" in out
    assert "dense: lm_head, model.embed_tokens, model.norm" in out


def test_plan_checks_the_target_format(bf16_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", str(bf16_dir), "--recipe", "gptq-4bit", "--no-probe", "--set", "weights.group_size=32"]
    code, out, err = cli([*args, "--format", "gptq"], capsys)
    assert code == 0 and "gptq: the plan exports" in out, err
    code, _, err = cli(["plan", str(bf16_dir), "--recipe", "pbllm-10", "--no-probe", "--format", "gptq"], capsys)
    assert code == 2 and "gptq cannot hold this plan" in one_line_error(err)


def test_the_disk_estimate_is_the_checkpoint_size(bf16_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rec = recipe.load("gptq-4bit", ["weights.group_size=32"])
    m, _ = models.load(models.resolve(str(bf16_dir)))
    est = estimate.estimate(m, models.arch_of(m), make_plan(m, models.arch_of(m), rec), rec, streamed=False)
    code, _, err = cli([str(bf16_dir), "--recipe", "gptq-4bit", "--out", str(tmp_path / "out"), *FAST], capsys)
    assert code == 0, err
    on_disk = checkpoint.disk_bytes(tmp_path / "out")
    assert abs(est.output - on_disk) <= 0.05 * on_disk  # tensors exact, headers estimated


def test_the_disk_estimate_counts_the_head_a_rotation_unties(bf16_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    edits = ["weights.group_size=32", "weights.lm_head=false", "overrides=[]"]
    m, _ = models.load(models.resolve(str(bf16_dir)))
    arch = models.arch_of(m)
    plain, rotated = (recipe.load(r, edits) for r in ("gptq-4bit", "rotate-gptq-4bit"))
    before, est = (estimate.estimate(m, arch, make_plan(m, arch, r), r, streamed=False, baseline_mb=0)
                   for r in (plain, rotated))
    head = m.get_output_embeddings().weight
    assert est.parts["resident model"] - before.parts["resident model"] == head.numel() * head.element_size()
    code, _, err = cli([str(bf16_dir), "--recipe", "rotate-gptq-4bit", "--out", str(tmp_path / "out"), *FAST,
                        *[a for e in edits for a in ("--set", e)]], capsys)
    assert code == 0, err
    on_disk = checkpoint.disk_bytes(tmp_path / "out")
    assert abs(est.output - on_disk) <= 0.05 * on_disk  # the untied head is on disk, dense
    assert est.output - before.output >= 0.9 * head.numel() * 2  # (bf16)


def test_a_run_that_would_not_fit_is_refused_before_calibration(bf16_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazy, "available_memory", lambda: 0)
    monkeypatch.setattr("compress.util.rss_mb", lambda: 1.0)
    code, _, err = cli([str(bf16_dir), "--recipe", "gptq-4bit", "--out", str(tmp_path / "out"), *FAST,
                        "--stream", "on"], capsys)
    line = one_line_error(err)
    assert code == 2 and "this run needs about" in line and "is available" in line
    assert not (tmp_path / "out").exists()


def test_the_estimate_shrinks_when_streamed(bf16_dir: Path) -> None:
    rec = recipe.load("gptq-4bit", ["weights.group_size=32"])
    m, _, _ = lazy.open_lazy(models.resolve(str(bf16_dir)))
    arch = models.arch_of(m)
    plan = make_plan(m, arch, rec)
    whole = estimate.estimate(m, arch, plan, rec, streamed=False, baseline_mb=0)
    streamed = estimate.estimate(m, arch, plan, rec, streamed=True, baseline_mb=0)
    assert streamed.parts["resident model"] < whole.parts["resident model"]
    assert streamed.output == whole.output
