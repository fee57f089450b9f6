"""atomic_write: the file is replaced whole, and a failed write leaves the old content and no temporary file."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.util import atomic_write


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, lambda tmp: tmp.write_text("old"))
    assert path.read_text() == "old"

    def half(tmp: Path) -> None:
        tmp.write_text("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_trim_memory_gives_the_freed_heap_back() -> None:
    """Small tensors come from glibc's heap; freed while a later one lives on, their pages stay resident until the
    trim (what made a long block-by-block run's resident memory creep up over depth)."""
    import torch

    from compress.util import _malloc_trim, rss_mb, trim_memory

    if _malloc_trim() is None:
        pytest.skip("not glibc: nothing to trim")
    xs = [torch.ones(16 * 1024) for _ in range(4096)]  # 256 MB in 64 kB pieces
    last = xs[-1]
    del xs
    held = rss_mb()
    trim_memory()
    assert rss_mb() < held - 128 and float(last.sum()) == 16 * 1024
