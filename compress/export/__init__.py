"""Exporters: write a compressed model in another runtime's checkpoint format, one module per format.

    compressed-tensors   pack-quantized INT weight-only: transformers (+ compressed-tensors), vLLM, SGLang
    gptq                 GPTQ v1 (qweight/qzeros/scales, GPTQModel's `dynamic` map): transformers (+ optimum,
                         gptqmodel), vLLM's gptq/gptq_marlin, SGLang, TGI
    gguf                 one model.gguf in ggml's own blocks (gguf-* recipes): llama.cpp, ollama, LM Studio

Every format module has `NAME`, `problems(plan, shapes, recipe=None, dtype=None, config=None) -> list[str]` (what
the format or its runtimes cannot hold, one line each with the fix; with a recipe it also judges what the
allocator will do, so it runs before any calibration; with the export's model dtype, whether it holds the
scales; with the model's config, whether the runtime knows the architecture) and `write(model, tokenizer, plan,
out, *, dtype, recipe=None)`. compressed-tensors and gptq hold affine layers (compress/codecs/affine.py); gguf
holds ggml layers (compress/codecs/ggml.py) and the affine grids that are ggml types.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from compress.errors import CompressError
from compress.export import compressed_tensors, gguf, gptq
from compress.nn import CompressedLinear
from compress.plan import Plan

if TYPE_CHECKING:
    from compress.recipe import Recipe

FORMATS: dict[str, ModuleType] = {"compressed-tensors": compressed_tensors, "gptq": gptq, "gguf": gguf}


def format_module(name: str) -> ModuleType:
    if name not in FORMATS:
        raise CompressError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def check(name: str, plan: Plan, shapes: Mapping[str, tuple[int, int]], recipe: Recipe | None = None,
          dtype: torch.dtype | None = None, config: Any = None) -> None:
    """Raise one CompressError naming what `name` cannot hold (the first problem, and how many more); `dtype`:
    the model dtype the export will be written in; `config`: the model's (transformers) config."""
    lines = format_module(name).problems(plan, shapes, recipe, dtype, config)
    experts = [n for n in plan if re.search(r"\.experts\.\d+\.", n)]
    if experts:  # our per-expert Linears (compress/moe.py) have no layout in these formats' MoE loaders yet
        lines.insert(0, f"mixture-of-experts Linears ({experts[0]} and {len(experts) - 1} more) have no {name} "
                        "layout here yet; keep the compress checkpoint, or skip the experts "
                        "(overrides: [{match: '*.experts.*', skip: true}]) and export from a dense-expert model")
    if lines:
        more = f" (and {len(lines) - 1} more problem{'s' if len(lines) > 2 else ''})" if len(lines) > 1 else ""
        raise CompressError(f"{name} cannot hold this plan: {lines[0]}{more}")


def export(checkpoint_dir: Path, name: str, out: Path, *, dtype: torch.dtype | None = None,
           verify_digests: bool = True, force: bool = False) -> Path:
    """Write the compress checkpoint in `checkpoint_dir` as format `name` into `out` (dense parts in `dtype`,
    default: the checkpoint's own); returns `out`. The checkpoint is verified as every load verifies it
    (compress/verify.py; `verify_digests=False` skips the checksums). `out` may hold an earlier export of the same
    format; anything else there is refused unless `force`."""
    from compress.checkpoint import load

    module = format_module(name)
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if out.resolve() == checkpoint_dir.resolve():
        raise CompressError(f"--out {out} is the checkpoint itself; choose another folder")
    check_target(out, name, force)
    model = load(checkpoint_dir, verify_digests=verify_digests)
    plan = Plan({n: m.spec for n, m in model.named_modules() if isinstance(m, CompressedLinear)})
    shapes = {n: (m.out_features, m.in_features) for n in plan for m in [model.get_submodule(n)]}
    dtype = dtype or _dense_dtype(model)
    check(name, plan, shapes, dtype=dtype, config=model.config)
    module.write(model, _tokenizer(checkpoint_dir), plan, out, dtype=dtype, recipe=_recipe(checkpoint_dir))
    return out


def _recipe(path: Path) -> Recipe | None:
    """The checkpoint's resolved recipe (recipe.yaml), when it has a readable one."""
    from compress import recipe

    try:
        return recipe.load(str(path / "recipe.yaml"))
    except (CompressError, OSError):
        return None


def check_target(out: Path, name: str, force: bool) -> None:
    """Refuse to write an export into a file, or into a non-empty folder that is not an export of this format."""
    if out.exists() and not out.is_dir():
        raise CompressError(f"--out {out} is a file; choose a folder")
    if force or not out.is_dir() or not any(out.iterdir()):
        return
    try:
        method = (json.loads((out / "config.json").read_text(encoding="utf-8")).get("quantization_config")
                  or {}).get("quant_method")
    except (OSError, ValueError, AttributeError):
        method = None
    if method != name:
        what = f"a {method} checkpoint" if method else "other files"
        raise CompressError(f"{out} already holds {what}; choose another --out, or pass --force to write the "
                            f"{name} export into it")


def _dense_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):  # a checkpoint written without a tokenizer (the Python API allows it)
        return None


__all__ = ["FORMATS", "check", "export", "format_module"]
