"""Content digests: what a checkpoint is verified against, and what resume and the eval cache key on.

    files_digest(paths)          one SHA-256 over the contents of some files (a model folder's weights)
    tensor_digests(file)         SHA-256 of each tensor's bytes in a safetensors file, by tensor name
    safetensors_header(file)     the parsed header of a safetensors file and where its data starts

Large files are hashed in chunks of CHUNK bytes on all cores (hashlib releases the GIL), so a 13 GB folder
costs seconds, not minutes (evals/verify_cost.py measures it). `files_digest` is therefore a hash of chunk
hashes ("sha256-c64m"), not `sha256sum` of the file; `tensor_digests` is plain SHA-256 of each tensor's bytes,
which any tool can recompute. Digests guard against damage (a flipped bit, a truncated copy), not against an
attacker who can rewrite the checksums file as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from compress.errors import CompressError

CHUNK = 64 << 20  # bytes per parallel hashing task
READ = 8 << 20  # bytes per read() inside a task
ALGORITHM = "sha256"


def _workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _hash_range(path: Path, start: int, length: int) -> str:
    """SHA-256 of `length` bytes of `path` from `start` (reads in READ-byte pieces: memory stays flat)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            piece = f.read(min(READ, left))
            if not piece:
                raise CompressError(f"{path} ended {left} bytes early while it was being read; the file is "
                                    "truncated: copy it again or re-run what wrote it")
            h.update(piece)
            left -= len(piece)
    return h.hexdigest()


def _map(jobs: list[tuple[Path, int, int]]) -> list[str]:
    if len(jobs) <= 1:
        return [_hash_range(*j) for j in jobs]
    with ThreadPoolExecutor(_workers()) as pool:
        return list(pool.map(lambda j: _hash_range(*j), jobs))


def files_digest(paths: Iterable[Path]) -> str:
    """One digest of the files' contents, in the order given (sorted by the caller if order is arbitrary):
    SHA-256 over each file's size and the SHA-256 of each of its CHUNK-byte pieces."""
    paths = [Path(p) for p in paths]
    jobs: list[tuple[Path, int, int]] = []
    sizes = []
    for p in paths:
        try:
            size = p.stat().st_size
        except OSError as e:
            raise CompressError(f"cannot read {p} ({e.strerror}); check that the file exists and is readable") from e
        sizes.append(size)
        jobs += [(p, s, min(CHUNK, size - s)) for s in range(0, size, CHUNK)]
    parts = iter(_map(jobs))
    top = hashlib.sha256()
    for size in sizes:
        top.update(f"{size}:".encode())
        for _ in range(0, size, CHUNK):
            top.update(next(parts).encode())
    return f"{ALGORITHM}-c{CHUNK >> 20}m:{top.hexdigest()}"


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header without __metadata__, offset of the data section); a file whose header cannot be read, or whose
    tensors reach past its end, is a CompressError naming the file."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        end = 0
        for name, v in header.items():
            lo, hi = v["data_offsets"]
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
                raise ValueError(f"bad data_offsets for {name}")
            end = max(end, hi)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CompressError(f"{path} is corrupt (unreadable safetensors header: {e}); "
                            "re-run the compression or copy the file again") from e
    if size < 8 + n + end:
        raise CompressError(f"{path} is truncated ({size} of {8 + n + end} bytes); "
                            "re-run the compression or copy the file again")
    return header, 8 + n


def tensor_digests(path: Path) -> dict[str, str]:
    """{tensor name: SHA-256 of its bytes} for one safetensors file."""
    header, start = safetensors_header(path)
    names = sorted(header)
    jobs = [(Path(path), start + header[k]["data_offsets"][0],
             header[k]["data_offsets"][1] - header[k]["data_offsets"][0]) for k in names]
    return dict(zip(names, _map(jobs), strict=True))
