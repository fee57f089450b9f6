"""CLI usage, counts, markup, eval vocabulary, dataset files

What a user types is refused in one `error:` line (exit 2) that names the option, file or checkpoint and the
fix: click's usage errors, counts out of range, local dataset files that cannot serve, a checkpoint of another
vocabulary given to `eval`. User text is printed literally, never read as rich markup.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import VOCAB, Verdict, cli, one_line_error, tiny_llama
from transformers import PreTrainedTokenizerFast

from compress import data, models
from compress.cli import _check_vocabulary
from compress.errors import CompressError


def refused(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """`compress ARGS` exits 2 with one error line holding every needle, and no traceback."""
    code, _, err = cli(args, capsys)
    line = one_line_error(err)
    assert code == 2, err
    for needle in needles:
        assert needle in line, line
    return line


# --- click's own usage errors -------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "needles"), [
    (["MODEL"], ("Missing option '--recipe'", "compress compress --help")),
    (["MODEL", "--recipe", "rtn-4bit", "--bogus"], ("No such option: --bogus",)),
    (["MODEL", "--recipe", "rtn-4bit", "--eval-windows", "abc"], ("'--eval-windows'", "integer")),
    (["MODEL", "--recipe", "rtn-4bit", "--threads", "1.5"], ("'--threads'", "integer")),
    (["MODEL", "--recipe"], ("'--recipe' requires an argument",)),
    (["MODEL", "--recipe", "rtn-4bit", "--verbose=3"], ("--verbose",)),
    (["MODEL", "OTHER", "--recipe", "rtn-4bit"], ("unexpected extra argument", "OTHER")),
    (["compress"], ("Missing argument 'model'",)),
    (["--bogus"], ("No such option: --bogus",)),
    (["eval"], ("Missing argument 'original'", "compress eval --help")),
    (["eval", "ORIG"], ("Missing argument 'compressed'",)),
    (["eval", "ORIG", "CKPT", "--seqlen", "x"], ("'--seqlen'", "integer")),
    (["eval", "ORIG", "CKPT", "--windows", "2.5"], ("'--windows'", "integer")),
    (["eval", "ORIG", "CKPT", "--suite"], ("'--suite' requires an argument",)),
    (["recipes", "extra"], ("unexpected extra argument", "extra", "compress recipes --help")),
    (["export"], ("Missing argument 'path'",)),
    (["export", "CKPT"], ("Missing option '--format'",)),
    (["evl", "ORIG", "CKPT"], ("Missing option '--recipe'", "mistyped `compress eval`")),
    (["recipez"], ("Missing option '--recipe'", "mistyped `compress recipes`")),
])
def test_usage_errors_are_one_line(args: list[str], needles: tuple[str, ...], capsys: pytest.CaptureFixture[str],
                                   verdict: Verdict) -> None:
    refused(args, capsys, *needles)
    verdict("error")


def test_short_help_prints_the_usage(capsys: pytest.CaptureFixture[str], verdict: Verdict) -> None:
    code, out, err = cli(["-h"], capsys)
    assert code == 0 and "compress MODEL --recipe NAME" in out + err and "error" not in err
    verdict("correct")


# --- counts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "needle"), [
    (["--eval-windows", "-1"], "--eval-windows -1 is out of range; it must be >= 0"),
    (["--threads", "0"], "--threads 0 is out of range; it must be >= 1"),
    (["--threads", "-4"], "--threads -4"),
])
def test_compress_counts_out_of_range_are_refused(tiny_llama_dir: Path, extra: list[str], needle: str,
                                                  capsys: pytest.CaptureFixture[str], verdict: Verdict) -> None:
    refused([str(tiny_llama_dir), "--recipe", "rtn-4bit", *extra], capsys, needle)
    verdict("error")


@pytest.mark.parametrize(("extra", "needle"), [
    (["--seqlen", "0"], "--seqlen 0 is out of range; it must be >= 1"),
    (["--seqlen", "-512"], "--seqlen -512"),
    (["--windows", "-1"], "--windows -1 is out of range; it must be >= 0"),
    (["--threads", "0"], "--threads 0"),
])
def test_eval_counts_out_of_range_are_refused(tiny_llama_dir: Path, tmp_path: Path, extra: list[str], needle: str,
                                              capsys: pytest.CaptureFixture[str], verdict: Verdict) -> None:
    refused(["eval", str(tiny_llama_dir), str(tmp_path), *extra], capsys, needle)
    verdict("error")


# --- user text is never markup ------------------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub, and a scratch working directory for the default out/ folder."""
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("model", ["[bold]x[/]", "[/]", "a[red]b", "x\\", ":smile:", "[link=file:///etc]x[/link]"])
def test_a_model_name_is_printed_literally(model: str, offline: None, capsys: pytest.CaptureFixture[str],
                                           verdict: Verdict) -> None:
    code, _, err = cli([model, "--recipe", "rtn-4bit"], capsys)
    line = one_line_error(err)
    assert code == 2 and f"model {model!r}" in line, line
    # the heading, before the load (rich's escape doubles a trailing backslash, so that it cannot escape a tag)
    assert f"compress {model.removesuffix(chr(92))}" in err and "recipe rtn-4bit" in err
    verdict("error")


@pytest.mark.parametrize(("args", "literal"), [
    (["[bold]m[/].gguf", "--recipe", "rtn-4bit"], "[bold]m[/].gguf"),
    (["MODEL", "--recipe", "[red]r[/]"], "[red]r[/]"),
    (["MODEL", "--recipe", "[/x]"], "[/x]"),
    (["MODEL", "--recipe", "rtn-4bit", "--set", "[/]=1"], "[/]"),
    (["MODEL", "--recipe", "rtn-4bit", "--set", "name=[b]x[/b]"], "[b]x[/b]"),
    (["MODEL", "--recipe", "rtn-4bit", "--calib", "[/]data.txt"], "[/]data.txt"),
    (["MODEL", "--recipe", "rtn-4bit", "--set", "description=:smile: [/]", "--set", "bits=1"], "bits"),
])
def test_error_text_is_printed_literally(args: list[str], literal: str, offline: None,
                                         capsys: pytest.CaptureFixture[str], verdict: Verdict) -> None:
    refused(args, capsys, literal)
    verdict("error")


def test_a_run_with_markup_in_every_name_prints_them_literally(tiny_llama_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               verdict: Verdict) -> None:
    model = tmp_path / "m[bold]x[/]"
    shutil.copytree(tiny_llama_dir, model)
    out = tmp_path / "o[/]:smile:"
    code, stdout, err = cli([str(model), "--recipe", "rtn-4bit", "--out", str(out), "--set", "name='[/]n'",
                             "--set", "weights.group_size=32", "--eval-windows", "0", "--threads", "1"], capsys)
    assert code == 0, err
    assert f"compress {model} · recipe [/]n" in err.replace("\n", "") and stdout.strip() == str(out)
    assert (out / "config.json").is_file()
    verdict("correct")


# --- eval: the checkpoint's vocabulary ----------------------------------------------------------------------

def other_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A BPE of the same size as `tokenizer`, trained on other text: equal length, other encodings."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as bpe

    tok = Tokenizer(bpe.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(tokenizer), special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(reversed(data.pydoc_text()[:200_000].split()))[::-1]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def fake_checkpoint(tmp_path: Path, tokenizer: PreTrainedTokenizerFast | None, vocab: int = VOCAB) -> Path:
    """A folder with a model's config.json (the check reads only that and the tokenizer files)."""
    d = tmp_path / "ckpt"
    tiny_llama(vocab_size=vocab).config.save_pretrained(d)
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", ["vocab_size", "tokenizer", "added-token"])
def test_eval_refuses_a_checkpoint_of_another_vocabulary(kind: str, tiny_llama_dir: Path, tmp_path: Path,
                                                         tokenizer: PreTrainedTokenizerFast,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str], verdict: Verdict) -> None:
    from compress import checkpoint, suite

    if kind == "vocab_size":
        ckpt, needle = fake_checkpoint(tmp_path, tokenizer, vocab=VOCAB + 16), f"vocab_size {VOCAB + 16}"
    elif kind == "tokenizer":
        ckpt, needle = fake_checkpoint(tmp_path, other_tokenizer(tokenizer)), "encodes"
    else:
        grown = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>")
        grown.add_tokens(["<extra>"])
        ckpt, needle = fake_checkpoint(tmp_path, grown), f"has {VOCAB + 1} tokens"

    def never(*a: object, **k: object) -> None:
        raise AssertionError("a model ran before the vocabulary check")

    monkeypatch.setattr(checkpoint, "load", never)
    monkeypatch.setattr(suite, "run", never)
    refused(["eval", str(tiny_llama_dir), str(ckpt), "--no-cache"], capsys, needle, str(ckpt), str(tiny_llama_dir),
            "pass that model as ORIGINAL")
    verdict("error")


@pytest.mark.parametrize("saved", ["same", "none"])
def test_a_checkpoint_of_the_same_vocabulary_passes(saved: str, tmp_path: Path, tokenizer: PreTrainedTokenizerFast,
                                                    verdict: Verdict) -> None:
    ckpt = fake_checkpoint(tmp_path, tokenizer if saved == "same" else None)
    _check_vocabulary(ckpt, tiny_llama().config, tokenizer, "original")
    verdict("correct")


def test_an_unreadable_checkpoint_config_is_one_line(tmp_path: Path, tokenizer: PreTrainedTokenizerFast,
                                                     verdict: Verdict) -> None:
    ckpt = fake_checkpoint(tmp_path, tokenizer)
    (ckpt / "config.json").write_text('{"vocab_size": 384,')
    with pytest.raises(CompressError, match=r"config\.json cannot be read as JSON") as e:
        _check_vocabulary(ckpt, tiny_llama().config, tokenizer, "original")
    assert "\n" not in str(e.value) and str(ckpt) in str(e.value)
    verdict("error")


# --- dataset files ------------------------------------------------------------------------------------------

def dataset(tmp_path: Path, kind: str) -> tuple[str, str]:
    """(the dataset argument, a needle its error holds) for one kind of unusable file."""
    f = tmp_path / f"{kind}.txt"
    if kind == "missing":
        return str(f), "does not exist"
    if kind == "missing-no-suffix":
        return str(tmp_path / "corpus"), "does not exist"
    if kind == "directory":
        f.mkdir()
        return str(f), "is a directory"
    if kind == "latin-1":
        f.write_bytes("Un café, s'il vous plaît. " .encode("latin-1") * 50)
        return str(f), "not UTF-8 text (byte 0xe9"
    if kind == "utf-16":
        f.write_text("some text " * 100, encoding="utf-16")
        return str(f), "not UTF-8"
    if kind == "empty":
        f.write_bytes(b"")
        return str(f), "is empty"
    if kind == "blank":
        f.write_text("\n \n\t\n")
        return str(f), "is empty"
    if kind == "nul-name":
        return str(tmp_path / "a\0b.txt"), "does not exist"
    if kind == "long-name":
        return str(tmp_path / ("x" * 5000 + ".txt")), "does not exist"
    raise ValueError(kind)


KINDS = ["missing", "missing-no-suffix", "directory", "latin-1", "utf-16", "empty", "blank", "nul-name", "long-name"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use", ["calibration", "evaluation"])
def test_unusable_dataset_files_are_one_line(kind: str, use: str, tmp_path: Path,
                                             tokenizer: PreTrainedTokenizerFast, verdict: Verdict) -> None:
    name, needle = dataset(tmp_path, kind)
    with pytest.raises(CompressError) as e:
        if use == "calibration":
            data.calibration(tokenizer, name, 4, 32)
        else:
            data.evaluation(tokenizer, name, 32, 2)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    if kind not in ("nul-name", "long-name"):
        assert name in msg
    verdict("error")


@pytest.mark.parametrize(("use", "text", "needle"), [
    ("evaluation", "hello world", "too few for one window of 64"),
    ("calibration", "hello world", "too few for windows of 64"),
    ("evaluation-all", "hello world", "too few for one window of 64"),
])
def test_a_text_too_short_for_one_window_is_one_line(use: str, text: str, needle: str, tmp_path: Path,
                                                     tokenizer: PreTrainedTokenizerFast, verdict: Verdict) -> None:
    f = tmp_path / "short.txt"
    f.write_text(text)
    with pytest.raises(CompressError) as e:
        if use == "calibration":
            data.calibration(tokenizer, str(f), 2, 64)
        else:
            data.evaluation(tokenizer, str(f), 64, None if use == "evaluation-all" else 2)
    assert needle in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)
    verdict("error")


def test_a_utf8_file_with_a_bom_and_non_ascii_text_serves(tmp_path: Path, tokenizer: PreTrainedTokenizerFast,
                                                          verdict: Verdict) -> None:
    f = tmp_path / "corpus.txt"
    f.write_text("Ünïcödé café — " + data.pydoc_text()[:20_000], encoding="utf-8-sig")
    w = data.evaluation(tokenizer, str(f), 32, 3)
    assert w.ids.shape == (3, 32) and w.source == str(f)
    verdict("correct")


@pytest.mark.parametrize("kind", ["missing", "latin-1", "empty", "directory"])
def test_compress_refuses_a_bad_calibration_file_before_loading_the_model(
        kind: str, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], verdict: Verdict) -> None:
    name, needle = dataset(tmp_path, kind)

    def never(*a: object, **k: object) -> None:
        raise AssertionError("the model loaded before the dataset was checked")

    monkeypatch.setattr(models, "load", never)
    monkeypatch.chdir(tmp_path)
    how = ["--calib", name] if kind in ("missing", "empty") else ["--set", f"calibrate.dataset={name}"]
    refused([str(tiny_llama_dir), "--recipe", "gptq-4bit", *how], capsys, needle, name)
    assert not (tmp_path / "out").exists()
    verdict("error")


@pytest.mark.parametrize("kind", ["missing", "utf-16", "blank"])
def test_eval_refuses_a_bad_dataset_file_before_loading_a_model(kind: str, tiny_llama_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 verdict: Verdict) -> None:
    name, needle = dataset(tmp_path, kind)

    def never(*a: object, **k: object) -> None:
        raise AssertionError("a model loaded before the dataset was checked")

    monkeypatch.setattr(models, "load", never)
    refused(["eval", str(tiny_llama_dir), str(tmp_path), "--dataset", name], capsys, needle, name)
    verdict("error")


def test_a_json_config_stays_the_checkpoint_s_own(tmp_path: Path, verdict: Verdict) -> None:
    """The vocabulary check reads a nested text_config (multimodal configs) too."""
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"text_config": {"vocab_size": VOCAB * 2}}))
    with pytest.raises(CompressError, match=f"vocab_size {VOCAB * 2}"):
        _check_vocabulary(d, tiny_llama().config, None, "original")
    verdict("error")


@pytest.mark.parametrize("origin", ["click", "typer._click"])
def test_a_usage_error_from_either_copy_of_click_is_one_line(origin: str, tiny_llama_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str],
                                                            verdict: Verdict) -> None:
    """typer 0.29 raises its vendored click's exceptions, other versions the installed click's: both are caught."""
    import importlib

    from compress import cli as cli_module

    exceptions = importlib.import_module(f"{origin}.exceptions")

    def bad(device: str) -> str:
        raise exceptions.BadParameter(f"{device} is not a device", param_hint="'--device'")

    monkeypatch.setattr(cli_module, "_check_device", bad)
    refused([str(tiny_llama_dir), "--recipe", "rtn-4bit", "--device", "tpu"], capsys,
            "Invalid value for '--device': tpu is not a device")
    verdict("error")
