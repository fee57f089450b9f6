"""compress: make large language models small.

    import compress
    model = compress.load("out/smollm2-135m-gptq-4bit")          # or AutoModelForCausalLM.from_pretrained
    result = compress.compress(model, tokenizer, compress.recipe.load("gptq-4bit"))

Importing the package registers the "compress" quantization method with transformers and imports only
what loading a checkpoint needs (core types, codecs, the runtime); the compression pipeline and its
methods are imported on first use of `compress.compress`, `compress.Result`, `compress.recipe` or
`compress.Recipe`.
"""

from __future__ import annotations

import importlib
from typing import Any

from compress import interrupt  # noqa: F401 (first: Ctrl-C while torch loads is one line)
from compress.checkpoint import load
from compress.errors import CompressError
from compress.hf import register
from compress.nn import CompressedLinear
from compress.plan import LayerSpec, LayerWeight, Plan

register()

_LAZY = {"compress": ("compress.pipeline", "compress"), "Result": ("compress.pipeline", "Result"),
         "Recipe": ("compress.recipe", "Recipe"), "recipe": ("compress.recipe", None)}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


__all__ = ["CompressError", "CompressedLinear", "LayerSpec", "LayerWeight", "Plan", "Recipe", "Result",
           "compress", "load", "recipe"]
__version__ = "0.1.0"
