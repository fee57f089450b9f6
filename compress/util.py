"""Small helpers with no place of their own in the stages: atomic writes and process memory."""

from __future__ import annotations

import ctypes
import functools
import os
import resource
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` whole or not at all: `write(tmp)` fills a temporary file beside it (same folder, so the
    rename stays on one file system), which is flushed to disk and renamed over `path`. If `write` fails, or
    the process is interrupted before the rename, `path` keeps its old content and the temporary file is
    removed (a hard kill can leave `<name>.tmp` behind, which the next write replaces)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "r+b") as f:  # (write access: Windows will not sync a read-only handle)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _status_mib(field: str) -> float | None:
    """A kB field of /proc/self/status (Linux) in MiB, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux VmRSS; the peak elsewhere)."""
    now = _status_mib("VmRSS")
    return peak_rss_mb() if now is None else now


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB. Linux's VmHWM, which starts afresh at exec
    (getrusage's ru_maxrss survives exec, so a benchmark child would report its parent's peak)."""
    peak = _status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak is None else peak  # KiB elsewhere


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def trim_memory() -> None:
    """Give the heap memory freed so far back to the OS (glibc's malloc_trim; nothing elsewhere). glibc keeps freed
    chunks below its mmap threshold (which grows to 32 MB as large tensors are freed) in its heap, so a long
    block-by-block run's resident memory creeps up block after block: a 7B-shaped model's peak went from 5.5 GB at
    two blocks to 6.9 GB at 32 without this; with a trim after each block it stays flat (evals/any_size.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
