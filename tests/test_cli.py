"""The command line on a tiny model: the main job end to end, eval, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FAST, cli, launch, one_line_error

import compress
from compress.cli import main


@pytest.fixture(scope="module")
def compressed_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "out"
    main([str(tiny_llama_dir), "--recipe", "gptq-4bit", "--out", str(out), *FAST])
    return out


def test_main_job_writes_a_complete_checkpoint(compressed_dir: Path) -> None:
    files = {p.name for p in compressed_dir.iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "README.md", "tokenizer.json"} <= files
    assert ".partial" not in files  # finished work directories are removed
    qc = json.loads((compressed_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compress" and qc["format_version"] == 3
    assert len(qc["plan"]) == 14 and qc["plan"]["model.layers.0.mlp.down_proj"]["bits"] == 4
    assert qc["avg_bits_code"] == 4.0
    assert "seqlen: 64" in (compressed_dir / "recipe.yaml").read_text()
    card = (compressed_dir / "README.md").read_text()
    assert "bits per weight" in card and "top-1 agreement" in card


def test_save_dtype_casts_only_the_dense_parts(tiny_llama_dir: Path, compressed_dir: Path, tmp_path: Path) -> None:
    """--save-dtype bfloat16: every dense tensor on disk is the default (source-dtype, here fp32) checkpoint's
    cast to bf16; codes and fp16 scales are bit-identical; the file is smaller and loads."""
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    main([str(tiny_llama_dir), "--recipe", "gptq-4bit", "--out", str(out), "--save-dtype", "bfloat16", *FAST])
    small, full = load_file(out / "model.safetensors"), load_file(compressed_dir / "model.safetensors")
    assert small.keys() == full.keys()
    assert full["model.embed_tokens.weight"].dtype == torch.float32  # auto: the source's own dtype
    for k, t in small.items():
        f = full[k]
        want = f.to(torch.bfloat16) if f.dtype == torch.float32 else f  # packed codes / fp16 scales: untouched
        assert t.dtype == want.dtype and torch.equal(t, want), k
    assert small["model.layers.0.self_attn.q_proj.scale"].dtype == torch.float16
    assert (out / "model.safetensors").stat().st_size < (compressed_dir / "model.safetensors").stat().st_size
    assert compress.load(out).model.embed_tokens.weight.dtype == torch.bfloat16


def test_eval_prints_both_models_and_writes_json(tiny_llama_dir: Path, compressed_dir: Path,
                                                 capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    args = ["eval", str(tiny_llama_dir), str(compressed_dir), "--seqlen", "64", "--windows", "3",
            "--baseline", "rtn-3bit"]
    code, out, _ = cli(args, capsys)
    assert code == 0
    assert "perplexity" in out and "top-1 agreement" in out and "rtn-3bit" in out
    res = json.loads((compressed_dir / "eval-quick-pydoc-64x3.json").read_text())
    orig, comp, rtn3 = res["models"]
    ppl = comp["tasks"]["ppl-pydoc-64x3"]
    assert ppl["kl_mean"] > 0 and 0 < ppl["top1"] <= 1 and comp["bits"][0] == 4.0
    assert ppl["tokens"] == 3 * 63
    assert comp["disk_bytes"] < orig["disk_bytes"]
    assert rtn3["bits"][0] == 3.0 and rtn3["tasks"]["ppl-pydoc-64x3"]["kl_mean"] > ppl["kl_mean"]
    assert (compressed_dir / "eval-quick-pydoc-64x3.md").is_file()
    code, _, _ = cli(args, capsys)  # served from the cache: same numbers
    assert code == 0 and json.loads((compressed_dir / "eval-quick-pydoc-64x3.json").read_text())["models"] == \
        res["models"]


def test_unknown_recipe_key_is_one_line_naming_it(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli([str(tiny_llama_dir), "--recipe", "gptq-4bit", "--set", "round.dmap=0.1"], capsys)
    assert code == 2
    msg = one_line_error(err)
    assert "round.dmap" in msg and "damp" in msg


def test_bad_value_is_one_line(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli([str(tiny_llama_dir), "--recipe", "gptq-4bit", "--set", "weights.bits=9"], capsys)
    assert code == 2 and "bits=9" in one_line_error(err)


def test_unknown_recipe_lists_the_available_ones(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli([str(tiny_llama_dir), "--recipe", "gptq-9bit"], capsys)
    assert code == 2 and "gptq-4bit" in one_line_error(err)


def test_missing_model_offline_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    from compress import models

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["no-such-org/no-such-model", "--recipe", "rtn-4bit"], capsys)
    msg = one_line_error(err)
    assert code == 2 and "no-such-org/no-such-model" in msg and "huggingface-cli download" in msg
    assert not (tmp_path / "out").exists(), "a failed load must not leave a work directory behind"


def test_truncated_safetensors_is_one_line(tiny_llama_dir: Path, compressed_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(compressed_dir, broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = cli(["eval", str(tiny_llama_dir), str(broken), "--seqlen", "64", "--windows", "1"], capsys)
    assert code == 2 and "truncated" in one_line_error(err)


def test_cuda_without_gpu_is_one_line(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = cli([str(tiny_llama_dir), "--recipe", "rtn-4bit", "--device", "cuda"], capsys)
    assert code == 2 and "--device cpu" in one_line_error(err)


def test_recipes_command_lists_named_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["recipes"], capsys)
    assert code == 0 and "gptq-3bit" in out and "rtn-4bit" in out


def test_ctrl_c_keeps_finished_blocks_and_says_how_to_resume(tiny_llama_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from compress import pipeline

    real = pipeline.compress

    def interrupted(*args: object, progress: object = None, **kw: object) -> object:
        def stop(rep: object) -> None:
            progress(rep)
            raise KeyboardInterrupt

        return real(*args, progress=stop, **kw)

    monkeypatch.setattr(pipeline, "compress", interrupted)
    out = tmp_path / "out"
    code, _, err = cli([str(tiny_llama_dir), "--recipe", "gptq-4bit", "--out", str(out), *FAST], capsys)
    assert code == 130 and "re-run the same command to resume" in err
    assert len(list((out / ".partial").glob("block_*.safetensors"))) == 1
    monkeypatch.setattr(pipeline, "compress", real)
    code, _, err = cli([str(tiny_llama_dir), "--recipe", "gptq-4bit", "--out", str(out), *FAST], capsys)
    assert code == 0 and "resuming: 1 finished blocks" in err
    assert not (out / ".partial").exists() and (out / "model.safetensors").is_file()


def test_discquant_run_reports_its_optimisation(tiny_llama_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dq"
    steps = ["--set", "round.steps=8", "--set", "round.warmup=2", "--set", "round.log_every=4"]
    code, stdout, err = cli([str(tiny_llama_dir), "--recipe", "discquant-3bit", "--out", str(out), *FAST, *steps],
                            capsys)
    assert code == 0, err
    assert "DiscQuant step 8/8" in stdout + err
    card = (out / "README.md").read_text()
    assert "| discquant | 8 steps x 2 windows = 1024 tokens" in card and "nan" not in card


def test_the_same_command_runs_under_torchrun(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m compress MODEL --recipe ...` (and `accelerate launch`) with a distillation
    stage: the distillation runs data-parallel, rank 0 alone writes, and the checkpoint is the one-process one."""
    kd = "distill={steps: 4, windows_per_step: 4, lr: 0.01, warmup: 1, topk: 16}"
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    out = {}
    for n, launcher in ((1, "torchrun"), (2, "torchrun"), (2, "accelerate")):
        d = tmp_path / f"{launcher}{n}"
        launch(n, ["-m", "compress", str(tiny_llama_dir), "--recipe", "rtn-4bit", "--set", "weights.bits=2", *FAST,
                   "--set", kd, "--out", str(d)], launcher)
        assert not (d / ".partial").exists()
        with torch.no_grad():
            out[d.name] = compress.load(d)(ids).logits
    torch.testing.assert_close(out["torchrun2"], out["torchrun1"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out["accelerate2"], out["torchrun2"], rtol=0, atol=0)


def test_baq_card_sets_its_prediction_against_the_measured_end_to_end_change(
        tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli([str(tiny_llama_dir), "--recipe", "baq-3bit", "--out", str(tmp_path / "baq"), *FAST], capsys)
    assert code == 0
    card = (tmp_path / "baq" / "README.md").read_text()
    line = next(x for x in card.splitlines() if x.startswith("| uniform 3-bit"))
    assert float(line.split("|")[3]) > 0  # the uniform reference's KL was measured on the same tokens
    assert "end to end, on the quick-check tokens" in card and "measured KL ratio" in err


def test_a_killed_distillation_resumes_to_the_uninterrupted_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle of the distillation stage (no clean-up runs), re-run the same command: it resumes
    from the last saved state and writes the same checkpoint as a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys

    kd = "distill={steps: 40, windows_per_step: 4, lr: 0.01, warmup: 1, topk: 16, save_every: 4, log_every: 4}"
    args = [sys.executable, "-m", "compress", str(tiny_llama_dir), "--recipe", "rtn-4bit", "--set", "weights.bits=2",
            *FAST, "--set", kd, "--threads", "1"]
    env = {**os.environ, "COLUMNS": "200"}
    subprocess.run([*args, "--out", str(tmp_path / "straight")], env=env, check=True, capture_output=True)
    p = subprocess.Popen([*args, "--out", str(tmp_path / "killed")], env=env, stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    for line in p.stderr:
        if "distill step 12/40" in line:  # states saved at 4, 8, 12: killed somewhere after
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    partial = tmp_path / "killed" / ".partial"
    assert p.returncode == -signal.SIGKILL and (partial / "distill-state.safetensors").is_file()
    done = subprocess.run([*args, "--out", str(tmp_path / "killed")], env=env, check=True, capture_output=True,
                          text=True)
    assert "distill: resuming at step" in done.stderr
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = compress.load(tmp_path / "straight")(ids).logits
        b = compress.load(tmp_path / "killed")(ids).logits
    assert torch.equal(a, b)


def test_format_at_compression_time_writes_a_servable_sibling(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    main([str(tiny_llama_dir), "--recipe", "gptq-4bit", "--out", str(out), "--format", "compressed-tensors",
          "--eval-windows", "0", *FAST])
    qc = json.loads((tmp_path / "out-compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compress"


def test_what_the_format_cannot_hold_is_refused_before_calibration(tiny_llama_dir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = cli([str(tiny_llama_dir), "--recipe", "gptq-4bit", "--out", str(out), "--format", "gptq",
                        *FAST, "--set", "weights.group_size=48"], capsys)  # K = 64 = 48 + a narrower 16
    assert code == 2 and "group_size" in one_line_error(err)
    assert not out.exists()  # nothing was calibrated or written
    code, _, err = cli([str(tiny_llama_dir), "--recipe", "pbllm-10", "--out", str(out), "--format",
                        "compressed-tensors", *FAST], capsys)
    assert code == 2 and "binary" in one_line_error(err) and not out.exists()
    code, _, err = cli([str(tiny_llama_dir), "--recipe", "gptq-4bit", "--out", str(out), "--format",
                        "compressed-tensors", "--save-dtype", "bfloat16", *FAST], capsys)  # fp16 scales, bf16 model
    line = one_line_error(err)
    assert code == 2 and "float16 scales are rounded to bfloat16" in line and "scale_dtype=bfloat16" in line
    assert not out.exists()


def test_a_recipe_that_serves_a_format_refuses_a_model_it_cannot_serve(tiny_llama_dir: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"  # no --format: the recipe's own `serves:` is checked on the loaded model
    code, _, err = cli([str(tiny_llama_dir), "--recipe", "gptq-4bit-serve", "--out", str(out), *FAST,
                        "--set", "weights.group_size=48"], capsys)
    line = one_line_error(err)
    assert code == 2 and "made to serve as" in line and "group_size" in line
    assert not out.exists()  # refused before any calibration or write


def test_export_command_writes_each_format(compressed_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    for fmt, method in (("gptq", "gptq"), ("compressed-tensors", "compressed-tensors")):
        code, stdout, _ = cli(["export", str(compressed_dir), "--format", fmt, "--out", str(tmp_path / fmt)], capsys)
        assert code == 0 and stdout.strip().endswith(fmt)
        assert json.loads((tmp_path / fmt / "config.json").read_text())["quantization_config"]["quant_method"] == method
        assert (tmp_path / fmt / "tokenizer.json").is_file()
    code, _, err = cli(["export", str(compressed_dir), "--format", "onnx"], capsys)
    assert code == 2 and "compressed-tensors" in one_line_error(err)
    code, _, err = cli(["export", str(compressed_dir), "--format", "gguf", "--out", str(tmp_path / "gguf")], capsys)
    line = one_line_error(err)  # an asymmetric g32 grid is no ggml type: the recipe that writes one is named
    assert code != 0 and "not a ggml type" in line and "gguf-q4_k_m" in line
