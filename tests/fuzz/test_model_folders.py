"""Poisoned model folders (remote code, pickles, NaN weights)

Planted code never runs, pickles are never loaded, damaged weights are refused.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import Verdict

from compress import models
from compress.errors import CompressError

PLANTED = "import pathlib; pathlib.Path(__file__).with_name('RAN').write_text('planted code ran')\n"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_clean_folder_loads(tiny_llama_dir: Path, verdict: Verdict) -> None:
    model, tok = models.load(models.resolve(str(tiny_llama_dir)))
    assert tok is not None and sum(p.numel() for p in model.parameters()) > 0
    verdict("correct")


def test_remote_code_is_refused_and_never_runs(tiny_llama_dir: Path, tmp_path: Path, verdict: Verdict) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "remote")
    (d / "modeling_evil.py").write_text(PLANTED)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompressError, match="needs remote code"):
        models.load(models.resolve(str(d)))
    assert not (d / "RAN").exists()
    verdict("error")


def test_pickle_only_weights_are_refused(tiny_llama_dir: Path, tmp_path: Path, verdict: Verdict) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "pickled")
    for f in d.glob("*.safetensors"):
        f.unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")  # what an attacker's pickle would sit in
    with pytest.raises(CompressError, match="only pickled weights") as e:
        models.load(models.resolve(str(d)))
    assert "\n" not in str(e.value) and "safetensors" in str(e.value)
    verdict("error")


def test_a_config_that_is_not_json_is_one_line(tiny_llama_dir: Path, tmp_path: Path, verdict: Verdict) -> None:
    d = _copy(tiny_llama_dir, tmp_path / "garbled")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CompressError, match="not a valid JSON object") as e:
        models.load(models.resolve(str(d)))
    assert "\n" not in str(e.value)
    verdict("error")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tiny_llama_dir: Path, tmp_path: Path, value: float,
                                                          verdict: Verdict) -> None:
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_llama_dir, tmp_path / "nan")
    f = next(d.glob("*.safetensors"))
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("layers.0.mlp.down_proj.weight"))
    sd[key][0, 0] = value
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CompressError, match=r"layers\.0\.mlp\.down_proj\.weight holds 1 NaN/Inf") as e:
        models.load(models.resolve(str(d)))
    assert "\n" not in str(e.value)
    verdict("error")
