"""Resume: changed inputs, damaged work files, locks, --force

Re-running a command resumes exactly what it finished or recomputes it (issue 18, part 3): work from other
inputs (model content, recipe, load dtype, calibration ids, version) is discarded with a warning naming what
changed; a truncated, garbled or misfitting file in OUT/.partial is recomputed; one run at a time holds an output
folder; another recipe's checkpoint, or a folder of other files, is only overwritten with --force. A killed run
re-runs to the checkpoint of a run that was never interrupted, tensor by tensor.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FAST, Verdict, cli, one_line_error, tiny_llama
from safetensors.torch import load_file, save_file

from compress import checkpoint, data, models, parallel, workdir
from compress.errors import CompressError

RANDOM = ["--set", "calibrate.dataset=random", "--eval-windows", "0"]  # no data files, no quick check
_references: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}


def args(model: Path, out: Path, *extra: str, recipe: str = "gptq-4bit") -> list[str]:
    return [str(model), "--recipe", recipe, "--out", str(out), *FAST, *RANDOM, *extra]


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def reference(model: Path, root: Path, capsys: pytest.CaptureFixture[str], *extra: str,
              recipe: str = "gptq-4bit") -> dict[str, torch.Tensor]:
    """The checkpoint of an uninterrupted run (cached per model and arguments within the session)."""
    key = (str(model), recipe, *extra)
    if key not in _references:
        out = root / f"reference-{len(_references)}"
        code, _, err = cli(args(model, out, *extra, recipe=recipe), capsys)
        assert code == 0, err
        _references[key] = tensors(out)
    return _references[key]


def full_disk(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def leave_partial(model: Path, out: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                  *extra: str, recipe: str = "gptq-4bit") -> Path:
    """Run to the end but fail writing the checkpoint: OUT/.partial then holds every file the stages keep."""
    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "save", full_disk)
        code, _, err = cli(args(model, out, *extra, recipe=recipe), capsys)
    assert code == 2 and "no space left" in one_line_error(err)
    return out / workdir.PARTIAL


def resumed(err: str) -> int:
    """How many blocks the run's table says were resumed from .partial."""
    return err.count("resumed from .partial")


@pytest.fixture
def model_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


# --- the fingerprint: what the work depends on ------------------------------------------------------------------

@pytest.mark.parametrize("change,extra,part", [
    ("recipe edit", ["--set", "round.damp=0.02"], "the recipe"),
    ("load dtype", ["--dtype", "float32"], "load dtype"),
    ("work-directory version", [], "version"),
])
def test_a_changed_input_discards_the_work_and_says_which(change: str, extra: list[str], part: str,
                                                          model_copy: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch, verdict: Verdict) -> None:
    out = tmp_path / "out"
    leave_partial(model_copy, out, capsys, monkeypatch)
    if change == "work-directory version":
        monkeypatch.setattr(workdir, "WORK_VERSION", workdir.WORK_VERSION + 1)
    with caplog.at_level(logging.WARNING):
        code, _, err = cli(args(model_copy, out, *extra), capsys)
    assert code == 0, err
    assert "discarding the unfinished work" in caplog.text and part in caplog.text, caplog.text
    assert resumed(err) == 0
    assert_same(tensors(out), reference(model_copy, tmp_path, capsys, *extra))
    verdict("correct")


def test_weights_changed_in_place_discard_the_work(model_copy: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch, verdict: Verdict) -> None:
    """Same path, same recipe, other weights (a re-downloaded or re-trained model): nothing is resumed."""
    out = tmp_path / "out"
    leave_partial(model_copy, out, capsys, monkeypatch)
    tiny_llama(seed=1).save_pretrained(model_copy)  # the folder's weights change, its name does not
    with caplog.at_level(logging.WARNING):
        code, _, err = cli(args(model_copy, out), capsys)
    assert code == 0 and "the model's weight files" in caplog.text and resumed(err) == 0
    other = tmp_path / "other-model"
    shutil.copytree(model_copy, other)
    assert_same(tensors(out), reference(other, tmp_path, capsys))
    verdict("correct")


def test_a_moved_model_folder_still_resumes(model_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch, verdict: Verdict) -> None:
    """The fingerprint holds the weights' content, not their path."""
    out = tmp_path / "out"
    leave_partial(model_copy, out, capsys, monkeypatch)
    moved = Path(shutil.move(model_copy, tmp_path / "moved"))
    code, _, err = cli(args(moved, out), capsys)
    assert code == 0 and resumed(err) == 2
    assert_same(tensors(out), reference(moved, tmp_path, capsys))
    verdict("correct")


def test_other_calibration_text_under_the_same_recipe_discards_the_work(
        tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, verdict: Verdict) -> None:
    """--calib FILE: the recipe names the file, so only the token ids (bound inside the run) tell the change."""
    text, out = tmp_path / "calib.txt", tmp_path / "out"
    text.write_text(data.pydoc_text()[:30_000])
    leave_partial(tiny_llama_dir, out, capsys, monkeypatch, "--calib", str(text))
    text.write_text(data.pydoc_text()[30_000:60_000])
    with caplog.at_level(logging.WARNING):
        code, _, err = cli(args(tiny_llama_dir, out, "--calib", str(text)), capsys)
    assert code == 0 and "calibration token ids changed" in caplog.text and resumed(err) == 0
    straight = tmp_path / "straight"
    assert cli(args(tiny_llama_dir, straight, "--calib", str(text)), capsys)[0] == 0
    assert_same(tensors(out), tensors(straight))
    verdict("correct")


# --- damaged files in the work directory ------------------------------------------------------------------------

def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_last_byte(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[-1] ^= 0xFF
    p.write_bytes(bytes(b))


def _foreign_keys(p: Path) -> None:
    t = {"not.a.block": torch.zeros(3)}  # a valid file with a valid digest, for no block of this model
    save_file(t, p, metadata={workdir.DIGEST_KEY: workdir.tensors_digest(t)})


def _stale_tmp(p: Path) -> None:
    p.with_name(p.name + ".tmp").write_bytes(os.urandom(300))  # a hard kill during a write
    p.unlink()


DAMAGE = {  # name -> (file in .partial, what is done to it, what the warning names)
    "block truncated": ("block_00001.safetensors", _truncate, "block_00001"),
    "block garbage": ("block_00001.safetensors", lambda p: p.write_bytes(os.urandom(2000)), "block_00001"),
    "block empty": ("block_00000.safetensors", lambda p: p.write_bytes(b""), "block_00000"),
    "block bit flipped in a tensor": ("block_00001.safetensors", _flip_last_byte, "does not match its digest"),
    "block of other keys": ("block_00000.safetensors", _foreign_keys, "does not fit block 0"),
    "fingerprint garbled": ("fingerprint.json", lambda p: p.write_text('{"model": '), "fingerprint.json"),
    "fingerprint missing": ("fingerprint.json", lambda p: p.unlink(), "fingerprint.json"),
    "allocation garbled": ("allocation.json", lambda p: p.write_bytes(b"\x00\xff{["), "allocation.json"),
    "stale tmp file": ("block_00001.safetensors", _stale_tmp, None),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_work_file_is_recomputed_never_resumed_wrongly(case: str, tiny_llama_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 verdict: Verdict) -> None:
    name, damage, named = DAMAGE[case]
    partial = leave_partial(tiny_llama_dir, tmp_path / "out", capsys, monkeypatch)
    damage(partial / name)
    with caplog.at_level(logging.INFO):
        code, _, err = cli(args(tiny_llama_dir, tmp_path / "out"), capsys)
    assert code == 0 and "Traceback" not in err, err
    if named is not None:
        assert named in caplog.text, caplog.text
    assert not list(partial.parent.rglob("*.tmp")) and not partial.exists()
    assert_same(tensors(tmp_path / "out"), reference(tiny_llama_dir, tmp_path, capsys))
    verdict("correct")


def test_a_block_of_another_plan_is_recomputed(tiny_llama_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch, verdict: Verdict) -> None:
    """A block file with a good digest but 3-bit shapes, in a 4-bit run's folder (copied by hand)."""
    three = leave_partial(tiny_llama_dir, tmp_path / "three", capsys, monkeypatch, "--set", "weights.bits=3")
    four = leave_partial(tiny_llama_dir, tmp_path / "four", capsys, monkeypatch)
    shutil.copy(three / "block_00001.safetensors", four / "block_00001.safetensors")
    with caplog.at_level(logging.WARNING):
        code, _, err = cli(args(tiny_llama_dir, tmp_path / "four"), capsys)
    assert code == 0 and "does not fit block 1" in caplog.text and resumed(err) == 1
    assert_same(tensors(tmp_path / "four"), reference(tiny_llama_dir, tmp_path, capsys))
    verdict("correct")


KD = "distill={steps: 8, windows_per_step: 4, lr: 0.01, warmup: 1, topk: 16, save_every: 4}"
EVO = ("allocate={method: evopress, target_bits: 3, choices: [2, 3, 4], generations: 3, offspring: 3, "
       "stages: [[2, 64], [1, 128]], topk: 16}")
STAGES = {  # the other stages' files: (recipe, edits, file in .partial, damage)
    "distillation state truncated": ("rtn-4bit", ["--set", "weights.bits=2", "--set", KD],
                                     "distill-state.safetensors", _truncate),
    "distillation teacher garbled": ("rtn-4bit", ["--set", "weights.bits=2", "--set", KD],
                                     "distill-teacher.safetensors", lambda p: p.write_bytes(os.urandom(64))),
    "evopress manifest garbled": ("gptq-4bit", ["--set", EVO], "evopress/manifest.json",
                                  lambda p: p.write_text("{")),
    "evopress level file truncated": ("gptq-4bit", ["--set", EVO],
                                      "evopress/levels/model.layers.1.mlp.up_proj.safetensors", _truncate),
    "evopress search state garbled": ("gptq-4bit", ["--set", EVO], "evopress/search.json",
                                      lambda p: p.write_text('{"generation": 2, "par')),
}


@pytest.mark.parametrize("case", list(STAGES))
def test_a_damaged_stage_file_is_recomputed(case: str, tiny_llama_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch, verdict: Verdict) -> None:
    recipe, extra, name, damage = STAGES[case]
    partial = leave_partial(tiny_llama_dir, tmp_path / "out", capsys, monkeypatch, *extra, recipe=recipe)
    damage(partial / name)
    with caplog.at_level(logging.WARNING):
        code, _, err = cli(args(tiny_llama_dir, tmp_path / "out", *extra, recipe=recipe), capsys)
    assert code == 0 and "Traceback" not in err, err
    assert Path(name).name in caplog.text, caplog.text
    assert_same(tensors(tmp_path / "out"), reference(tiny_llama_dir, tmp_path, capsys, *extra, recipe=recipe))
    verdict("correct")


# --- one run per output folder ----------------------------------------------------------------------------------

HOLD = ("import sys, time; from pathlib import Path; from compress import workdir\n"
        "with workdir.lock(Path(sys.argv[1]), 'compress holder --recipe x'):\n"
        "    print('held', flush=True); time.sleep(120)\n")


def _hold(out: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def _no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the output folder was checked")
    monkeypatch.setattr(models, "load", refuse)


def test_a_second_run_on_a_held_folder_fails_at_once_naming_the_holder(tiny_llama_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      verdict: Verdict) -> None:
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        _no_load(monkeypatch)
        code, _, err = cli(args(tiny_llama_dir, out), capsys)
        line = one_line_error(err)
        assert code == 2 and f"pid {holder.pid}" in line and "compress holder" in line
        assert sorted(p.name for p in out.iterdir()) == [workdir.LOCK]  # nothing of ours was written
    finally:
        holder.kill()
        holder.wait()
    verdict("error")


def test_the_lock_of_a_killed_run_goes_away_with_it(tiny_llama_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], verdict: Verdict) -> None:
    out = tmp_path / "out"
    holder = _hold(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / workdir.LOCK).is_file()  # the file stays; its flock died with the process
    code, _, err = cli(args(tiny_llama_dir, out), capsys)
    assert code == 0, err
    assert not (out / workdir.LOCK).exists()
    assert_same(tensors(out), reference(tiny_llama_dir, tmp_path, capsys))
    verdict("correct")


def test_only_rank_0_takes_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verdict: Verdict) -> None:
    """Under torchrun the other ranks run in the same folder as rank 0, which holds the lock."""
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        monkeypatch.setattr(parallel, "rank", lambda: 1)
        with workdir.lock(out, "rank 1"):
            pass
        monkeypatch.setattr(parallel, "rank", lambda: 0)
        with pytest.raises(CompressError, match=f"pid {holder.pid}"), workdir.lock(out, "rank 0"):
            pass
    finally:
        holder.kill()
        holder.wait()
    verdict("correct")


def test_a_lock_file_removed_under_a_waiting_run_is_not_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               verdict: Verdict) -> None:
    """A run that ends removes OUT/.lock. A run that opened the old file just before must not lock that deleted
    file (a third run would lock a new one beside it): the lock is retried on the path's current file."""
    out = tmp_path / "out"
    out.mkdir()
    with workdir.lock(out, "first"):
        stale = os.open(out / workdir.LOCK, os.O_RDWR)  # opened while "first" held it
    real, opened = os.open, []

    def open_stale_first(path: str | Path, flags: int, mode: int = 0o777) -> int:
        opened.append(path)
        return os.dup(stale) if len(opened) == 1 else real(path, flags, mode)

    monkeypatch.setattr(os, "open", open_stale_first)
    try:
        with workdir.lock(out, "second"):
            info = json.loads((out / workdir.LOCK).read_text())
            assert info["pid"] == os.getpid() and info["command"] == "second"
    finally:
        os.close(stale)
    assert len(opened) == 2  # the deleted file was locked, seen to be gone, and the current one taken instead
    verdict("correct")


# --- --force ----------------------------------------------------------------------------------------------------

def test_another_recipes_checkpoint_is_not_overwritten_without_force(tiny_llama_dir: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     verdict: Verdict) -> None:
    out = tmp_path / "out"
    assert cli(args(tiny_llama_dir, out, recipe="rtn-4bit"), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _no_load(monkeypatch)
    code, _, err = cli(args(tiny_llama_dir, out), capsys)
    line = one_line_error(err)
    assert code == 2 and "recipe rtn-4bit" in line and "--force" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    verdict("error")


@pytest.mark.parametrize("content", ["notes", "garbled config", "other model"])
def test_a_folder_of_other_files_is_not_written_without_force(content: str, tiny_llama_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              verdict: Verdict) -> None:
    out = tmp_path / "out"
    if content == "other model":
        shutil.copytree(tiny_llama_dir, out)  # a dense model folder: its config.json is no compress checkpoint
    else:
        out.mkdir()
        name, text = ("notes.txt", "mine") if content == "notes" else ("config.json", '{"quantization_config": ')
        (out / name).write_text(text)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _no_load(monkeypatch)
    code, _, err = cli(args(tiny_llama_dir, out), capsys)
    line = one_line_error(err)
    assert code == 2 and "is not a compress checkpoint" in line and "--force" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    verdict("error")


def test_force_overwrites_another_recipes_checkpoint(tiny_llama_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str], verdict: Verdict) -> None:
    out = tmp_path / "out"
    assert cli(args(tiny_llama_dir, out, recipe="rtn-4bit"), capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = cli(args(tiny_llama_dir, out, "--force"), capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["recipe"] == "gptq-4bit"
    assert (out / "notes.txt").read_text() == "mine"  # --force writes the checkpoint; it deletes nothing else
    assert_same(tensors(out), reference(tiny_llama_dir, tmp_path, capsys))
    verdict("correct")


def test_the_same_recipe_may_rewrite_its_own_checkpoint(tiny_llama_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], verdict: Verdict) -> None:
    out = tmp_path / "out"
    assert cli(args(tiny_llama_dir, out), capsys)[0] == 0
    code, _, err = cli(args(tiny_llama_dir, out), capsys)
    assert code == 0, err
    assert_same(tensors(out), reference(tiny_llama_dir, tmp_path, capsys))
    verdict("correct")


# --- a hard kill ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def six_blocks(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny Llama with six blocks (time to kill a run between two block files)."""
    d = tmp_path_factory.mktemp("six-blocks")
    tiny_llama(num_hidden_layers=6).save_pretrained(d)
    for f in tiny_llama_dir.glob("tokenizer*"):
        shutil.copy(f, d)
    return d


@pytest.mark.parametrize("extra", [[], ["--set", "round.asymmetric=0.25", "--set", "reconstruct.epochs=2"]],
                         ids=["gptq", "gptaq+reconstruct"])
def test_a_gptq_run_killed_after_its_first_block_resumes_to_the_same_checkpoint(six_blocks: Path, tmp_path: Path,
                                                                                verdict: Verdict,
                                                                                extra: list[str]) -> None:
    """SIGKILL (no clean-up runs) once block 0 is on disk; a garbled block file and a stale temporary file are
    planted (what a damaged disk or a kill mid-write leaves); the re-run equals an uninterrupted run. With GPTAQ
    and block reconstruction the resumed run rebuilds the dense stream through the finished blocks."""
    base = [sys.executable, "-m", "compress", str(six_blocks), "--recipe", "gptq-4bit", *FAST, *RANDOM,
            "--threads", "1", *extra]
    env = {**os.environ, "COLUMNS": "200"}
    subprocess.run([*base, "--out", str(tmp_path / "straight")], env=env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    p = subprocess.Popen([*base, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    first = killed / workdir.PARTIAL / "block_00000.safetensors"
    deadline = time.monotonic() + 300
    while not first.is_file() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL and first.is_file() and not (killed / "model.safetensors").exists()
    partial = killed / workdir.PARTIAL
    (partial / "block_00004.safetensors").write_bytes(os.urandom(4096))  # garbled, never finished
    (partial / "block_00003.safetensors.tmp").write_bytes(os.urandom(512))  # a write cut short
    done = subprocess.run([*base, "--out", str(killed)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr and "block_00004.safetensorscannotberead" in "".join(done.stderr.split())
    assert not partial.exists()
    assert_same(tensors(killed), tensors(tmp_path / "straight"))
    verdict("correct")
