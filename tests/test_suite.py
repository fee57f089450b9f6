"""Eval suites: results equal a direct computation, a second run is served from the cache without loading
any model, offline hub datasets are skipped with a reason, and the report is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run, tiny_llama

from compress import data, evaluate, suite, tasks

TASKS = (suite.Perplexity("pydoc", 64, 4), suite.MultipleChoice(n=12, context=16, continuation=4, choices=3))


def entries() -> list[suite.Entry]:
    def compressed(name: str) -> torch.nn.Module:
        m = tiny_llama()
        run(m, name)
        return m

    return [suite.Entry("original", "fp-orig", tiny_llama, {}),
            suite.Entry("rtn4", "fp-rtn4", lambda: compressed("rtn-4bit"), {"bits": (4.0, 4.5)}),
            suite.Entry("gptq2", "fp-gptq2", lambda: compressed("gptq-2bit"), {"bits": (2.0, 2.5)})]


def test_suite_matches_direct_computation_and_caches(tokenizer, tmp_path: Path) -> None:
    cache = suite.Cache(tmp_path / "cache")
    es = entries()
    report = suite.run(TASKS, es, tokenizer, cache)
    ev = data.evaluation(tokenizer, "pydoc", 64, 4)
    direct = evaluate.compare({e.name: e.model for e in es}, ev.ids)
    ppl = report.results[TASKS[0].key]
    for r, d in zip(ppl, direct, strict=True):
        assert r["ppl"] == pytest.approx(d.ppl) and r["top1"] == d.top1
    dense = es[0].model  # tied embeddings count once; packed models hold their codes, not dense weights
    assert ppl[0]["memory_bytes"] == sum(p.numel() * p.element_size() for p in dense.parameters()) + sum(
        b.numel() * b.element_size() for b in dense.buffers())
    assert ppl[2]["memory_bytes"] < ppl[1]["memory_bytes"] < ppl[0]["memory_bytes"]
    items = tasks.pydoc_mc(tokenizer, 12, 16, 4, 3, 0)
    mc = report.results[TASKS[1].key]
    assert [r["accuracy"] for r in mc] == [tasks.score(e.model, items).accuracy for e in es]

    def boom() -> torch.nn.Module:
        raise AssertionError("a cached model was loaded")

    again = [suite.Entry(e.name, e.fingerprint, boom, e.facts) for e in es]
    cached = suite.run(TASKS, again, tokenizer, cache)
    assert cached.results == report.results
    md = suite.markdown(cached)
    assert md.count("\n") == 4 and "gptq2" in md
    json.dumps(cached.to_dict())


def test_new_model_is_scored_against_the_original_without_rescoring_cached_ones(tokenizer, tmp_path: Path) -> None:
    cache = suite.Cache(tmp_path)
    es = entries()
    suite.run(TASKS[:1], es[:2], tokenizer, cache)
    loaded = []

    def tracked(e: suite.Entry) -> suite.Entry:
        return suite.Entry(e.name, e.fingerprint, lambda: loaded.append(e.name) or e.load(), e.facts)

    report = suite.run(TASKS[:1], [tracked(e) for e in es], tokenizer, cache)
    assert loaded == ["original", "gptq2"]  # the original is needed for KL; rtn4 came from the cache
    assert report.results[TASKS[0].key][2]["kl_mean"] > 0


def test_offline_hub_dataset_is_skipped_with_the_reason(tokenizer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = suite.run((suite.Perplexity("wikitext2", 64, 2),), entries()[:1], tokenizer, suite.Cache(None))
    assert "not in the local cache" in report.skipped["ppl-wikitext2-64x2"]
    assert "skipped ppl-wikitext2-64x2" in suite.markdown(report)


def test_plot_draws_quality_against_bits(tokenizer, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = suite.run(TASKS[:1], entries(), tokenizer, suite.Cache(None))
    png = suite.plot(report, tmp_path / "q.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def _loglik(model: torch.nn.Module, tok, context: str, continuation: str) -> float:
    """lm-eval's convention, computed independently: continuation tokens = tokens(context + continuation)
    after the tokens of the context."""
    ctx = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_lm_eval_adapter_matches_an_independent_computation(tokenizer, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    docs = [{"q": "The keyword def", "choices": ["defines a function", "is a number", "opens a file"], "label": 0},
            {"q": "A for loop", "choices": ["repeats a block", "raises an error", "imports a module"], "label": 0},
            {"q": "The return statement", "choices": ["leaves a function", "is a comment", "sorts a list"],
             "label": 0},
            {"q": "A class", "choices": ["has methods", "is a loop", "is a string"], "label": 1}]
    (tmp_path / "tiny.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'tiny.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n")
    es = entries()[:2]
    task = suite.LmEval(tasks=("tiny_mc",), include_path=str(tmp_path), batch_size=1)
    report = suite.run((task,), es, tokenizer, suite.Cache(None))
    for e, r in zip(es, report.results[task.key], strict=True):
        picks = [max(range(3), key=lambda c, d=d: _loglik(e.model, tokenizer, d["q"], " " + d["choices"][c]))
                 for d in docs]
        right = sum(p == d["label"] for p, d in zip(picks, docs, strict=True))
        assert r["tiny_mc/acc"] == pytest.approx(right / len(docs))
        assert "tiny_mc/acc_stderr" in r
