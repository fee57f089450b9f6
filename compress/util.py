"""Small helpers with no home of their own: process memory, and swapping modules in for a while."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from compress.nn import set_module


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB. Linux's VmHWM, which starts afresh at exec
    (getrusage's ru_maxrss survives exec, so a benchmark child would report its parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, the fallback elsewhere


@contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """The model with `modules` in place of its own (e.g. the uniform reference of an allocation), restored after."""
    own = {n: model.get_submodule(n) for n in modules}
    for n, m in modules.items():
        set_module(model, n, m)
    try:
        yield model
    finally:
        for n, m in own.items():
            set_module(model, n, m)
