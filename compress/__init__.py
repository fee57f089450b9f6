"""compress: make large language models small.

    import compress
    model = compress.load("out/smollm2-135m-gptq-4bit")          # or AutoModelForCausalLM.from_pretrained
    result = compress.compress(model, tokenizer, compress.recipe.load("gptq-4bit"))

Importing the package registers the "compress" quantization method with transformers.
"""

from __future__ import annotations

from compress import recipe
from compress.checkpoint import load
from compress.errors import CompressError
from compress.hf import register
from compress.nn import CompressedLinear
from compress.pipeline import Result, compress
from compress.plan import LayerSpec, LayerWeight, Plan
from compress.recipe import Recipe

register()

__all__ = ["CompressError", "CompressedLinear", "LayerSpec", "LayerWeight", "Plan", "Recipe", "Result",
           "compress", "load", "recipe"]
__version__ = "0.1.0"
