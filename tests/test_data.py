"""Token windows: the pydoc protocol layout, determinism, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from compress import data
from compress.errors import CompressError


def test_pydoc_eval_and_calibration_windows_are_disjoint_and_consecutive(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer(data.pydoc_text(), return_tensors="pt").input_ids[0]
    ev = data.evaluation(tokenizer, "pydoc", 64, 10)
    cal = data.calibration(tokenizer, "pydoc", 5, 64)
    assert ev.ids.shape == (10, 64) and ev.ids.flatten().tolist() == ids[:640].tolist()
    start = data.PYDOC_CALIB_START
    assert cal.ids.flatten().tolist() == ids[start : start + 5 * 64].tolist()


def test_local_text_file_calibration_is_seeded(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    f = tmp_path / "corpus.txt"
    f.write_text(data.pydoc_text()[:50_000], encoding="utf-8")
    a = data.calibration(tokenizer, str(f), 4, 32, seed=1)
    b = data.calibration(tokenizer, str(f), 4, 32, seed=1)
    c = data.calibration(tokenizer, str(f), 4, 32, seed=2)
    assert (a.ids == b.ids).all() and not (a.ids == c.ids).all()


def test_random_windows_need_no_tokenizer() -> None:
    w = data.calibration(None, "random", 3, 16, vocab_size=100)
    assert w.ids.shape == (3, 16) and int(w.ids.max()) < 100


def test_too_many_windows_is_a_clear_error(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(CompressError, match="room for"):
        data.calibration(tokenizer, "pydoc", 100_000, 512)


def test_unknown_dataset_is_a_clear_error(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(CompressError, match="unknown dataset 'nope'"):
        data.calibration(tokenizer, "nope", 4, 32)
