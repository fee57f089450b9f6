"""The resumable work directory of a run, `OUT/.partial/`, and the output folder's guards (issue 18).

    OUT/.lock                    held (flock) by the one run writing OUT; its pid and command are written in it
    OUT/.partial/fingerprint.json  what the work below was computed from (see `WorkDir`)
    OUT/.partial/block_*.safetensors  one finished block each, with a digest of its tensors in the metadata
    OUT/.partial/...             the other stages' state (allocation.json, teachers, level database, training)

Resume is exact or it does not happen: work from other inputs is discarded (saying which input changed), a file
that cannot be read back is recomputed (saying which), and a finished checkpoint of another recipe is never
overwritten without --force. Under several processes (compress.parallel) rank 0 alone checks, writes and locks.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from compress import digest, parallel
from compress import format as fmt
from compress.errors import CompressError
from compress.models import ModelRef
from compress.util import atomic_write

log = logging.getLogger(__name__)

WORK_VERSION = 2  # the layout of .partial (2: digests in block files, bound inputs); older work is discarded
PARTIAL = ".partial"
LOCK = ".lock"
STAMP = "fingerprint.json"
DIGEST_KEY = "compress_digest"  # block files: metadata key of `tensors_digest` of their tensors
SPACE = (errno.ENOSPC, errno.EDQUOT)
# what each part of a fingerprint is, in the warning that says why old work was discarded
PARTS = {"version": "the compress, torch or transformers version", "model": "the model's weight files or config.json",
         "recipe": "the recipe (or a --set edit)", "dtype": "the load dtype (--dtype)",
         "device": "the device kind (--device)", "calibration": "the calibration token ids"}


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `tensors` (any dtype, any layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_files(ref: ModelRef) -> list[Path]:
    """The files a model's weights are read from (the .gguf file, or the folder's *.safetensors and config.json;
    for a hub id, those of its cached snapshot): what the work directory's `model` digest covers."""
    folder = Path(ref.source)
    if ref.gguf_file:
        return [folder / ref.gguf_file]
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref.source, "config.json")
        if not isinstance(cached, str):
            return []
        folder = Path(cached).parent
    return [*sorted(folder.glob("*.safetensors")), *[p for p in [folder / "config.json"] if p.is_file()]]


def fingerprint(ref: ModelRef, recipe: dict[str, Any], dtype: str, device: str) -> dict[str, Any]:
    """What a run's blocks depend on, known before the model is calibrated (the calibration ids are bound later,
    `WorkDir.bind`): the model's content (not its path: a moved folder still resumes), the resolved recipe, the
    load dtype and the device kind (CPU and CUDA round differently in the last bits)."""
    files = model_files(ref)
    model = digest.files_digest(files) if files else {"source": ref.source, "gguf": ref.gguf_file}
    return {"model": model, "recipe": recipe, "dtype": str(dtype), "device": torch.device(device).type}


def _versions() -> dict[str, Any]:
    """The code a result depends on: this layout, the checkpoint format, and the libraries that do the math."""
    try:
        transformers = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers = None
    return {"work": WORK_VERSION, "format": fmt.FORMAT_VERSION, "torch": torch.__version__,
            "transformers": transformers}


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def space_error(e: OSError, where: Path, what: str, need: str | None, then: str) -> CompressError:
    """The one line for a full disk (or quota): where, how much is free and needed, and `then`: what was kept and
    how to go on."""
    try:
        free = human_bytes(shutil.disk_usage(where if where.exists() else where.parent).free)
    except OSError:
        free = "unknown"
    needs = f", {need}" if need else ""
    return CompressError(f"no space left ({e.strerror}) on the device of {where} while writing {what}: {free} "
                         f"free{needs}; {then}")


def write_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: `e` itself, or the one safetensors' writer reports only as text
    ("Error while serializing: I/O error: No space left on device (os error 28)"); None for anything else."""
    if isinstance(e, OSError):
        return e
    found = re.search(r"\(os error (\d+)\)", str(e)) if isinstance(e, SafetensorError) else None
    return None if found is None else OSError(int(found[1]), os.strerror(int(found[1])))


def resume_hint(kept: str) -> str:
    """The end of a full-disk line: what was kept, and that the same command resumes it."""
    return f"{kept}: free some space and re-run the same command to resume"


class WorkDir:
    """Finished blocks (and the other stages' state) of an unfinished run, so that re-running it resumes.

    `fingerprint` holds what the work depends on (`fingerprint()`); the code's versions are added here. Old
    work whose fingerprint differs is discarded with a warning naming the part that changed; inputs only known
    later (the calibration token ids) are added with `bind`. Every file is written to a temporary name and
    renamed; files that cannot be read back (truncated, garbled, left by a hard kill) are removed when the
    directory is opened, so they are recomputed instead of resumed wrongly. Under several processes only rank 0
    checks and writes; the others read what it wrote.
    """

    def __init__(self, out_dir: Path, fingerprint: dict[str, Any]) -> None:
        self.dir = Path(out_dir) / PARTIAL
        self.fingerprint = json.loads(json.dumps({**fingerprint, "version": _versions()}, sort_keys=True,
                                                 default=str))
        with parallel.main_first():
            if parallel.is_main():
                try:
                    self._open()
                except OSError as e:
                    if e.errno not in SPACE:
                        raise
                    raise space_error(e, self.dir, "the work directory", None,
                                      resume_hint(f"what was finished is kept in {self.dir}")) from None

    # --- opening and binding ------------------------------------------------------------------------------

    def _open(self) -> None:
        if self.dir.exists() and not self.dir.is_dir():
            log.warning("removing %s: it is a file, not the work directory", self.dir)
            self.dir.unlink()
        old = self._read_stamp() if self.dir.is_dir() else None
        if old is not None:
            changed = [k for k in self.fingerprint if old.get(k) != self.fingerprint[k]]
            if changed:
                self._discard(", ".join(PARTS.get(k, k) for k in changed) + " changed since it was written")
            else:  # same inputs: keep what was bound later in that run (bind compares with it)
                self.fingerprint = {**old, **self.fingerprint}
                self._scrub()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_stamp()

    def _read_stamp(self) -> dict[str, Any] | None:
        """The stored fingerprint; None (and the work discarded) when it is missing or cannot be read."""
        stamp = self.dir / STAMP
        try:
            old = json.loads(stamp.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
            return old
        except FileNotFoundError:
            why = f"it has no {STAMP} (it cannot be told what it was computed from)"
        except (OSError, ValueError) as e:
            why = f"{stamp} cannot be read ({str(e)[:80]})"
        if any(self.dir.iterdir()):
            self._discard(why)
        return None

    def _write_stamp(self) -> None:
        text = json.dumps(self.fingerprint, indent=1, sort_keys=True)
        self._write(self.dir / STAMP, lambda tmp: tmp.write_text(text), "the work directory's fingerprint")

    def _discard(self, why: str) -> None:
        log.warning("discarding the unfinished work in %s: %s", self.dir, why)
        shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)

    def _holds_work(self) -> bool:
        return any(p.name != STAMP for p in self.dir.iterdir())

    def bind(self, name: str, value: str) -> None:
        """Add an input known only inside the run (e.g. "calibration": the digest of the token ids) to the
        fingerprint; finished work computed from another value, or from an unrecorded one, is discarded. Every
        process calls it at the same point (rank 0 decides first, the others then find its decision)."""
        with parallel.main_first():
            if not parallel.is_main():
                return
            have = self.fingerprint.get(name)
            if have != value and self._holds_work():
                self._discard(f"{PARTS.get(name, name)} changed since it was written" if have is not None
                              else f"{PARTS.get(name, name)} were not recorded with it")
            if have != value:
                self.fingerprint[name] = value
                self._write_stamp()

    # --- files that cannot be read back ---------------------------------------------------------------------

    def _scrub(self) -> None:
        """Remove what a hard kill or a damaged disk left: stale *.tmp files, and JSON or safetensors files that
        do not parse (a manifest that does not parse takes its folder with it: what it described is unknown)."""
        for p in sorted(self.dir.rglob("*")):
            if not p.exists() or p.is_dir() or (p.name == STAMP and p.parent == self.dir):
                continue
            if p.name.endswith(".tmp"):
                log.info("removing %s, left by an interrupted write", p)
                p.unlink()
                continue
            why = _unreadable(p)
            if why is None:
                continue
            if p.name == "manifest.json" and p.parent != self.dir:
                log.warning("%s %s; recomputing everything in %s", p, why, p.parent)
                shutil.rmtree(p.parent)
            else:
                log.warning("%s %s; it is recomputed", p, why)
                p.unlink()

    def drop_block(self, i: int, why: str) -> None:
        """Treat block i's file as missing (it is recomputed), saying why."""
        log.warning("%s %s; block %d is recomputed", self._path(i), why, i)
        if parallel.is_main():
            self._path(i).unlink(missing_ok=True)

    # --- blocks and JSON state -------------------------------------------------------------------------------

    def _path(self, i: int) -> Path:
        return self.dir / f"block_{i:05d}.safetensors"

    @property
    def finished(self) -> int:
        return len(list(self.dir.glob("block_*.safetensors")))

    def load_block(self, i: int) -> dict[str, torch.Tensor] | None:
        """Block i's saved tensors, or None when there is no file or it does not match its digest (recomputed)."""
        p = self._path(i)
        if not p.is_file():
            return None
        try:
            with safe_open(p, "pt") as f:
                stored = (f.metadata() or {}).get(DIGEST_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        except (SafetensorError, OSError) as e:
            self.drop_block(i, f"cannot be read ({str(e)[:80]})")
            return None
        if stored != tensors_digest(tensors):
            self.drop_block(i, "does not match its digest (damaged)")
            return None
        return tensors

    def save_block(self, i: int, block: nn.Module, total: int | None = None) -> None:
        """Write block i (rank 0); a full disk ends the run in one line that keeps the finished blocks."""
        if not parallel.is_main():
            return
        tensors = {k: v.detach().contiguous() for k, v in block.state_dict().items()}
        meta = {DIGEST_KEY: tensors_digest(tensors)}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        left = (total - i) if total else 1
        need = (f"about {human_bytes(size * left)} needed for the {left} blocks left (and about as much again for the "
                "checkpoint)")
        self._write(self._path(i), lambda tmp: save_file(tensors, tmp, metadata=meta),
                    f"block {i}" + (f" of {total}" if total else ""), need,
                    kept=f"the {self.finished} finished blocks are kept in {self.dir}")

    def load_json(self, name: str) -> Any:
        p = self.dir / f"{name}.json"
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as e:
            log.warning("%s cannot be read (%s); it is recomputed", p, str(e)[:80])
            if parallel.is_main():
                p.unlink(missing_ok=True)
            return None

    def save_json(self, name: str, obj: Any) -> None:
        if not parallel.is_main():
            return
        text = json.dumps(obj, default=float)
        self._write(self.dir / f"{name}.json", lambda tmp: tmp.write_text(text), f"{name}.json")

    def _write(self, path: Path, write: Any, what: str, need: str | None = None, kept: str | None = None) -> None:
        try:
            atomic_write(path, write)
        except (OSError, SafetensorError) as e:
            err = write_error(e)
            if err is None or err.errno not in SPACE:
                raise
            raise space_error(err, self.dir, what, need,
                              resume_hint(kept or f"the finished work is kept in {self.dir}")) from None

    def remove(self) -> None:
        if parallel.is_main():
            shutil.rmtree(self.dir, ignore_errors=True)


def _unreadable(p: Path) -> str | None:
    """Why a work file cannot be read back (None: it can): JSON that does not parse, a safetensors file whose
    header or length is wrong. (Bytes changed inside a tensor are caught only where a digest is kept: blocks.)"""
    try:
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            with safe_open(p, "pt") as f:
                f.metadata()
    except (SafetensorError, OSError, ValueError) as e:
        return f"cannot be read ({str(e)[:80]})"
    return None


# --- the output folder ----------------------------------------------------------------------------------------

def check_target(out: Path, recipe: str, force: bool) -> None:
    """Refuse, before any work, to write a checkpoint over one of another recipe, or into a folder holding other
    files (a run's own .partial and .lock aside); `force` (--force) allows both. Re-running the same recipe
    may overwrite its own checkpoint."""
    if force or not out.is_dir():
        return
    others = sorted(p.name for p in out.iterdir() if p.name not in (PARTIAL, LOCK))
    if not others:
        return
    found = _checkpoint_recipe(out)
    if found == recipe:
        return
    if found is not None:
        raise CompressError(f"{out} holds a finished checkpoint of recipe {found}, not {recipe}; choose another "
                            "--out, or pass --force to overwrite it")
    listing = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    raise CompressError(f"{out} is not empty ({listing}) and is not a compress checkpoint; choose another --out, "
                        "or pass --force to write the checkpoint into it")


def _checkpoint_recipe(out: Path) -> str | None:
    """The recipe a compress checkpoint in `out` was made with; None when `out` holds no compress checkpoint."""
    try:
        qc = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != fmt.QUANT_METHOD:
        return None
    return str(qc.get("recipe") or "(unnamed)")


@contextmanager
def lock(out: Path, command: str) -> Iterator[None]:
    """Hold OUT/.lock for the body: one run at a time per output folder. The folder (and missing parents) is
    created, and removed again at the end if the run left it empty (a refused or failed start leaves nothing
    behind). flock belongs to the open file, so a killed run's lock goes away with the process; the lock file's
    text (pid, command) only tells a second run whom it waits for. Rank 0 alone takes it."""
    if not parallel.is_main():
        yield
        return
    created = _make_dirs(out)
    try:
        fd = _acquire(out / LOCK, command)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        (out / LOCK).unlink(missing_ok=True)  # before closing: no other run can hold it yet
        os.close(fd)
        _remove_empty(created)


def _make_dirs(out: Path) -> list[Path]:
    """Create `out` and its missing parents (deepest first in the list returned); refuse in one line a path that
    is a file, or that cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise CompressError(f"--out {out} is a file, not a folder; choose a folder (it is created if missing)")
    missing = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), out)
        raise CompressError(f"cannot create the output folder {out}: {blocker} is a file; choose another --out"
                            ) from None
    except OSError as e:
        raise CompressError(f"cannot create the output folder {out} ({e.strerror}); choose another --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        _remove_empty(missing)
        raise CompressError(f"cannot write in the output folder {out} (not writable); choose another --out or make "
                            "it writable")
    return missing


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first; a folder that holds anything stays
        try:
            d.rmdir()
        except OSError:
            return


def _acquire(path: Path, command: str) -> int:
    """Open and flock `path`; a lock held by another process is a CompressError naming its pid and command."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a run that ended just now removed the folder it had made (empty): again
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as e:
            raise CompressError(f"cannot write in the output folder {path.parent} ({e.strerror}); choose another "
                                "--out or make it writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise CompressError(f"{path.parent} is being written by another compress run ({holder}); wait for it "
                                "to end, or choose another --out") from None
        except OSError as e:  # a file system without locks (ENOLCK): run, but say so
            log.warning("cannot lock %s (%s): nothing stops a second run on the same folder", path, e.strerror)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # (else the holder removed the file between our open and lock: lock the new one)
            break
        os.close(fd)
    text = json.dumps({"pid": os.getpid(), "command": command[:300], "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
    except OSError as e:
        path.unlink(missing_ok=True)
        os.close(fd)
        if e.errno not in SPACE:
            raise
        raise space_error(e, path.parent, "its lock file", None, "free some space and run it again") from None
    return fd


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {info['pid']}, since {info.get('since', '?')}: {' '.join(str(info.get('command', '')).split())}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown: it is starting"
