"""Imports point down: core ← methods ← pipeline ← face, and the runtime (what loading a checkpoint needs)
never imports compression code. Parsed from the source with `ast`, imports inside functions included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {  # module (or package prefix) -> layer; a module may import its own layer and the ones below
    "core": ["errors", "plan", "format", "grid", "codecs", "reports", "recipe", "models", "data", "parallel", "util",
             "digest", "interrupt", "moe", "lazy", "ggml", "mix"],
    "runtime": ["nn", "hf", "checkpoint", "verify", "workdir", "kernels", "export", "__init__"],
    "methods": ["round", "allocate", "prune", "mst", "distill", "teacher", "train", "rotate", "reconstruct"],
    "pipeline": ["pipeline", "sequential", "estimate"],
    "face": ["cli", "card", "suite", "evaluate", "tasks", "baselines", "__main__"],
}
KNOWN = {name for names in LAYERS.values() for name in names}
ORDER = {"core": 0, "runtime": 1, "methods": 2, "pipeline": 3, "face": 4}
# Imports that go up on purpose, each with its reason (and nothing else may).
ALLOWED = {
    # the recipe validates its round/allocate/distill sections with the methods' own Configs, imported when a
    # recipe is parsed (never when a checkpoint is loaded)
    ("recipe", "allocate"), ("recipe", "round"), ("recipe", "distill"),
}


def layer_of(module: str) -> str:
    head = module.split(".")[0]
    for layer, names in LAYERS.items():
        if head in names:
            return layer
    raise AssertionError(f"compress.{module} has no layer in tests/test_architecture.py: add it to LAYERS")


def sources() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "compress").rglob("*.py"):
        rel = p.relative_to(ROOT / "compress").with_suffix("")
        out[".".join(rel.parts).removesuffix(".__init__") or "__init__"] = p
    for p in (ROOT / "kernels").rglob("*.py"):
        rel = p.relative_to(ROOT / "kernels").with_suffix("")
        out[".".join(("kernels", *rel.parts)).removesuffix(".__init__")] = p
    return out


def type_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (annotations only, never run)."""
    out = set()
    for node in ast.walk(tree):
        test = node.test if isinstance(node, ast.If) else None
        if test is not None and "TYPE_CHECKING" in ast.unparse(test):
            out |= {id(n) for b in node.body for n in ast.walk(b)}
    return out


def imports(path: Path, module: str) -> set[str]:
    """compress modules imported anywhere in a file that runs (relative to `compress.`)."""
    out = set()
    tree = ast.parse(path.read_text())
    skip = type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name.removeprefix("compress.") for a in node.names if a.name.startswith("compress.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "compress":
                out |= {a.name for a in node.names}
            elif node.module.startswith("compress."):
                out.add(node.module.removeprefix("compress."))
    return {m for m in out if m.split(".")[0] in KNOWN}


def test_every_import_points_down_or_sideways() -> None:
    bad = []
    for module, path in sources().items():
        mine = layer_of(module)
        for target in imports(path, module):
            theirs = layer_of(target)
            key = (module.split(".")[0], target.split(".")[0])
            if ORDER[theirs] > ORDER[mine] and key not in ALLOWED:
                bad.append(f"compress.{module} ({mine}) imports compress.{target} ({theirs})")
    assert not bad, "imports that point up:\n" + "\n".join(sorted(bad))


def test_the_allowed_exceptions_are_still_needed() -> None:
    used = {(m.split(".")[0], t.split(".")[0]) for m, p in sources().items() for t in imports(p, m)}
    assert used >= ALLOWED, f"drop these from ALLOWED: {sorted(ALLOWED - used)}"


def test_importing_compress_loads_no_compression_code() -> None:
    """`import compress` (what from_pretrained of a checkpoint needs) imports core and runtime modules only."""
    code = ("import sys, compress; print(' '.join(m for m in sys.modules if m.startswith('compress')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    loaded = {m.removeprefix("compress.") for m in out if m != "compress"}
    upper = sorted(m for m in loaded if ORDER[layer_of(m)] >= ORDER["methods"])
    assert not upper, f"import compress loaded compression code: {upper}"
    assert {"nn", "hf", "checkpoint", "plan", "codecs"} <= loaded
