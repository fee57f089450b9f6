"""Just-in-time builds of the C++/CUDA extensions (torch.utils.cpp_extension.load), shared by cpu_ext and
cuda.build: one build directory per `tag` (sources, torch, flags), timing in the log, and a failed build reported as a
reason string instead of an exception (a forward must fall back to the next backend, never crash)."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)


def tag(sources: list[Path], *extra: str) -> str:
    """A build directory's key: the sources' bytes and paths, this torch (its version and where it is installed:
    its headers are on the compile line) and `extra` (flags). Two checkouts or two virtual environments get two
    directories: sharing one, ninja sees another command line each time and rebuilds the extension back and forth."""
    h = hashlib.sha256()
    for p in sources:
        h.update(p.read_bytes())
        h.update(str(p.resolve()).encode())
    where = str(Path(torch.__file__).resolve())
    h.update("|".join([torch.__version__, str(torch.version.cuda), where, *extra]).encode())
    return h.hexdigest()[:12]


def build(name: str, source: Path, build_dir: Path, what: str, **kwargs: Any) -> tuple[ModuleType | None, str | None]:
    """(module, None) after building `source` into `build_dir`, or (None, why) when the build fails."""
    from torch.utils import cpp_extension

    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ext = cpp_extension.load(name=name, sources=[str(source)], build_directory=str(build_dir), verbose=False,
                                 **kwargs)
        log.info("%s ready in %.1f s (%s)", what, time.perf_counter() - t0, build_dir)
        return ext, None
    except Exception as e:
        first = str(e).strip().splitlines()[:3]
        return None, f"building {source.name} failed ({type(e).__name__}: {' '.join(first)}); see {build_dir}"
