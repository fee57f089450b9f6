"""Exporters: write a compressed model in another runtime's checkpoint format, one module per format.

    compressed-tensors   pack-quantized INT weight-only: transformers (+ compressed-tensors), vLLM, SGLang
    gptq                 GPTQ v1 (qweight/qzeros/scales, GPTQModel's `dynamic` map): transformers (+ optimum,
                         gptqmodel), vLLM's gptq/gptq_marlin, SGLang, TGI

Every format module has `NAME`, `problems(plan, shapes, recipe=None, dtype=None) -> list[str]` (what the format
or its runtimes cannot hold, one line each with the fix; with a recipe it also judges what the allocator will
do, so it runs before any calibration; with the export's model dtype, whether it holds the scales) and
`write(model, tokenizer, plan, out, *, dtype)`. The formats hold affine layers only; they are built from the
layers' affine codec (compress/codecs/affine.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from compress.errors import CompressError
from compress.export import compressed_tensors, gptq
from compress.nn import CompressedLinear
from compress.plan import Plan

if TYPE_CHECKING:
    from compress.recipe import Recipe

FORMATS: dict[str, ModuleType] = {"compressed-tensors": compressed_tensors, "gptq": gptq}


def format_module(name: str) -> ModuleType:
    if name not in FORMATS:
        raise CompressError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def check(name: str, plan: Plan, shapes: Mapping[str, tuple[int, int]], recipe: Recipe | None = None,
          dtype: torch.dtype | None = None) -> None:
    """Raise one CompressError naming what `name` cannot hold (the first problem, and how many more); `dtype`:
    the model dtype the export will be written in."""
    lines = format_module(name).problems(plan, shapes, recipe, dtype)
    if lines:
        more = f" (and {len(lines) - 1} more problem{'s' if len(lines) > 2 else ''})" if len(lines) > 1 else ""
        raise CompressError(f"{name} cannot hold this plan: {lines[0]}{more}")


def export(checkpoint_dir: Path, name: str, out: Path, *, dtype: torch.dtype | None = None,
           verify_digests: bool = True) -> Path:
    """Write the compress checkpoint in `checkpoint_dir` as format `name` into `out` (dense parts in `dtype`,
    default: the checkpoint's own); returns `out`. The checkpoint is verified as every load verifies it
    (compress/verify.py; `verify_digests=False` skips the checksums)."""
    from compress.checkpoint import load

    module = format_module(name)
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if out.resolve() == checkpoint_dir.resolve():
        raise CompressError(f"--out {out} is the checkpoint itself; choose another folder")
    model = load(checkpoint_dir, verify_digests=verify_digests)
    plan = Plan({n: m.spec for n, m in model.named_modules() if isinstance(m, CompressedLinear)})
    shapes = {n: (m.out_features, m.in_features) for n in plan for m in [model.get_submodule(n)]}
    dtype = dtype or _dense_dtype(model)
    check(name, plan, shapes, dtype=dtype)
    module.write(model, _tokenizer(checkpoint_dir), plan, out, dtype=dtype)
    return out


def _dense_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):  # a checkpoint written without a tokenizer (the Python API allows it)
        return None


__all__ = ["FORMATS", "check", "export", "format_module"]
