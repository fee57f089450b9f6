"""Output paths built from user text (model, recipe names)

User text never places a file outside the chosen output folder.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Verdict

from compress.cli import _default_out


@pytest.mark.parametrize("model,recipe", [
    ("../../etc", "gptq-4bit"), ("smollm2-135m", "../../../tmp/x"), ("/abs/..", "a/b\\c"), ("..", ".."),
    ("~/model.gguf", "$(rm -rf ~)"), ("", ""),
])
def test_default_out_is_one_component_under_out(model: str, recipe: str, verdict: Verdict) -> None:
    out = _default_out(model, recipe)
    assert out.parent == Path("out") and len(out.parts) == 2
    assert ".." not in out.name and "/" not in out.name and "\\" not in out.name and out.name != "."
    verdict("correct")


def test_ordinary_names_are_kept(verdict: Verdict) -> None:
    assert _default_out("smollm2-135m", "gptq-4bit") == Path("out/smollm2-135m-gptq-4bit")
    assert _default_out("/models/SmolLM2-135M.gguf", "baq-3bit") == Path("out/smollm2-135m-baq-3bit")
    verdict("correct")
