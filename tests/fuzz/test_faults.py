"""Faults: full disk, bad --out, Ctrl-C at start-up

A fault ends the run in one line and keeps the finished work (issue 18, part 5): a full disk while a block or
the checkpoint is written says where and how much is needed, and the re-run resumes to the exact checkpoint;
an --out that is a file, not writable or not creatable is refused before the model loads; Ctrl-C while the
command starts (importing torch, loading the model) prints "interrupted" and exits 130, never a traceback.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers.modeling_utils
from helpers import FAST, Verdict, cli, one_line_error
from safetensors import SafetensorError
from safetensors.torch import load_file

from compress import interrupt, models, workdir
from compress.cli import main

ARGS = [*FAST, "--set", "calibrate.dataset=random", "--eval-windows", "0"]


def args(model: Path, out: Path, *extra: str) -> list[str]:
    return [str(model), "--recipe", "gptq-4bit", "--out", str(out), *ARGS, *extra]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def straight(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of an uninterrupted run."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    main(args(tiny_llama_dir, out))
    return out


def enospc(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def enospc_safetensors(*_: object, **__: object) -> None:
    """What safetensors' writer really raises on a full disk: no OSError, only its text."""
    raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} (os error {errno.ENOSPC})")


FULL = {"OSError": enospc, "safetensors error": enospc_safetensors}


# --- a full disk ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raised", list(FULL))
def test_a_full_disk_while_a_block_is_written_keeps_the_finished_blocks(raised: str, tiny_llama_dir: Path,
                                                                        straight: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str],
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        verdict: Verdict) -> None:
    real = safetensors.torch.save_file

    def second_block_fails(tensors: dict[str, torch.Tensor], path: str | Path, **kw: object) -> None:
        if "block_00001" in str(path):
            FULL[raised]()
        real(tensors, path, **kw)

    out = tmp_path / "out"
    monkeypatch.setattr(workdir, "save_file", second_block_fails)
    code, _, err = cli(args(tiny_llama_dir, out), capsys)
    line = one_line_error(err)
    assert code == 2 and "no space left" in line and "block 1 of 2" in line and "needed" in line
    assert str(out / ".partial") in line and "re-run the same command" in line
    partial = out / ".partial"
    assert [p.name for p in partial.glob("block_*")] == ["block_00000.safetensors"]  # finished, no temporary file
    monkeypatch.setattr(workdir, "save_file", real)
    code, _, err = cli(args(tiny_llama_dir, out), capsys)
    assert code == 0 and err.count("resumed from .partial") == 1
    assert_same_checkpoint(out, straight)
    verdict("correct")


@pytest.mark.parametrize("raised", list(FULL))
def test_a_full_disk_while_the_checkpoint_is_written_keeps_every_block(raised: str, tiny_llama_dir: Path,
                                                                       straight: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       verdict: Verdict) -> None:
    """transformers writes config.json, then the weights fail: the re-run computes nothing again."""
    out = tmp_path / "out"
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", FULL[raised])
    code, _, err = cli(args(tiny_llama_dir, out), capsys)
    line = one_line_error(err)
    assert code == 2 and "no space left" in line and "the checkpoint" in line and "KB needed" in line
    assert len(list((out / ".partial").glob("block_*.safetensors"))) == 2
    monkeypatch.undo()
    code, _, err = cli(args(tiny_llama_dir, out), capsys)
    assert code == 0 and err.count("resumed from .partial") == 2
    assert_same_checkpoint(out, straight)
    verdict("correct")


def test_another_write_error_in_the_checkpoint_is_one_line(tiny_llama_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch, verdict: Verdict) -> None:
    def eio(*_: object, **__: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), "model.safetensors")

    out = tmp_path / "out"
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", eio)
    code, _, err = cli(args(tiny_llama_dir, out), capsys)
    line = one_line_error(err)
    assert code == 2 and "cannot write the checkpoint" in line and os.strerror(errno.EIO) in line
    assert len(list((out / ".partial").glob("block_*.safetensors"))) == 2
    verdict("error")


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    p = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp && umount /tmp"],
                       capture_output=True)
    return p.returncode == 0


REAL_DISK = textwrap.dedent("""
    import contextlib, io, json, shutil, subprocess, sys
    from pathlib import Path
    from compress.cli import main

    model, mnt, work, sizes, extra = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5]

    def cli(out):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                main([model, "--recipe", "gptq-4bit", "--out", str(out), *json.loads(extra)])
                code = 0
            except SystemExit as e:
                code = int(e.code or 0)
        return code, err.getvalue()

    report = {"straight": cli(work / "straight")}
    for size in json.loads(sizes):
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
        first = cli(mnt / "out")
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        again = cli(mnt / "out")
        if again[0] == 0:
            shutil.copytree(mnt / "out", work / size)
        subprocess.run(["umount", str(mnt)], check=True)
        report[size] = [first, again]
    print(json.dumps(report))
""")


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` and a tmpfs mount (user namespaces)")
def test_a_really_full_disk_ends_in_one_line_and_the_rerun_resumes_exactly(tiny_llama_dir: Path, tmp_path: Path,
                                                                           verdict: Verdict) -> None:
    """A real small tmpfs (in a private mount namespace), full at three points: before the first block, before
    the second, and in the checkpoint; then it is enlarged and the same command is run again."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sizes = ["16k", "48k", "120k"]
    script = tmp_path / "disk.py"
    script.write_text(REAL_DISK)
    p = subprocess.run(["unshare", "-rm", sys.executable, str(script), str(tiny_llama_dir), str(mnt), str(tmp_path),
                        json.dumps(sizes), json.dumps(ARGS)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["straight"][0] == 0
    where = []
    for size in sizes:
        (code, err), (again, err2) = report[size]
        line = one_line_error(err)
        assert code == 2 and "no space left" in line and "re-run the same command to resume" in line, line
        assert again == 0 and "Traceback" not in err2, err2
        assert_same_checkpoint(tmp_path / size, tmp_path / "straight")
        where.append(line.split(" while writing ")[1].split(":")[0])
    assert where == ["block 0 of 2", "block 1 of 2", "the checkpoint"], where
    verdict("correct")


# --- a bad --out ------------------------------------------------------------------------------------------------

def _no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(models, "load", refuse)


SYS = Path("/sys/kernel")


@pytest.mark.parametrize("case", ["an existing file", "under a file", "not writable", "parent not creatable"])
def test_a_bad_out_is_refused_before_the_model_loads(case: str, tiny_llama_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch, verdict: Verdict) -> None:
    file = tmp_path / "file"
    file.write_text("mine")
    if case in ("not writable", "parent not creatable") and not SYS.is_dir():
        pytest.skip("needs sysfs (/sys/kernel) for a folder nobody may write in, root included")
    out, expect = {"an existing file": (file, "is a file, not a folder"),
                   "under a file": (file / "out", f"{file} is a file"),
                   "not writable": (SYS, "cannot write in the output folder"),
                   "parent not creatable": (SYS.parent / "compress-fuzz" / "out", "cannot create the output folder"),
                   }[case]
    _no_load(monkeypatch)
    code, _, err = cli(args(tiny_llama_dir, out), capsys)
    line = one_line_error(err)
    assert code == 2 and expect in line and "--out" in line, line
    assert file.read_text() == "mine" and not (SYS / workdir.LOCK).exists()
    verdict("error")


# --- Ctrl-C at start-up -----------------------------------------------------------------------------------------

CTRL_C_AT_TORCH = textwrap.dedent("""
    import os, signal, sys

    class CtrlC:  # Ctrl-C arrives while `import torch` starts (the slowest part of starting)
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, CtrlC())
""")


def test_ctrl_c_while_the_command_imports_torch_is_one_line(tmp_path: Path, verdict: Verdict) -> None:
    """`python -m compress` (torchrun's way, and the console script's: same handler): a sitecustomize plants the
    Ctrl-C at the first `import torch`, which `import compress` does."""
    (tmp_path / "sitecustomize.py").write_text(CTRL_C_AT_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "compress", "recipes"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 130 and p.stderr == "interrupted\n" and p.stdout == "", p.stderr[-2000:]
    verdict("correct")


def test_ctrl_c_while_the_console_script_starts_is_one_line(verdict: Verdict) -> None:
    """What the `compress` script runs (`from compress.cli import main`), with its argv[0]."""
    code = CTRL_C_AT_TORCH + "sys.argv[0] = 'compress'\nfrom compress.cli import main\nmain(['recipes'])\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 130 and p.stderr == "interrupted\n", p.stderr[-2000:]
    verdict("correct")


def test_a_library_user_keeps_pythons_own_ctrl_c(verdict: Verdict) -> None:
    """`import compress` in someone else's program installs no handler: their KeyboardInterrupt is theirs."""
    code = CTRL_C_AT_TORCH + "try:\n    import compress\nexcept KeyboardInterrupt:\n    print('theirs')\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "theirs", p.stderr[-2000:]
    verdict("correct")


def test_main_hands_ctrl_c_back_to_python(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                          verdict: Verdict) -> None:
    """Once main() runs, Ctrl-C raises KeyboardInterrupt again (so a run keeps its finished blocks first)."""
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(sys, "argv", ["compress", "recipes"])
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupt.at_startup()
        assert signal.getsignal(signal.SIGINT) is interrupt._exit_now
        assert cli(["recipes"], capsys)[0] == 0
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    verdict("correct")


def test_ctrl_c_while_the_model_loads_is_one_line_and_leaves_nothing(tiny_llama_dir: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     verdict: Verdict) -> None:
    def ctrl_c(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "new" / "out"
    monkeypatch.setattr(models, "load", ctrl_c)
    code, _, err = cli(args(tiny_llama_dir, out), capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not (tmp_path / "new").exists()  # the folders the run made for its lock are gone again
    verdict("correct")
