"""Load-only integration with transformers: `import compress` registers the "compress" quant method,
after which `AutoModelForCausalLM.from_pretrained(out_dir)` builds the model skeleton, swaps the
planned Linears for `CompressedLinear` on the meta device, and lets transformers fill the packed
buffers from the safetensors (gpt-fast's convert_for_runtime + load_state_dict(assign=True), through
the HfQuantizer hooks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from compress import format as fmt
from compress import verify
from compress.errors import CompressError


class CompressConfig(QuantizationConfigMixin):
    """`quantization_config` of a compress checkpoint: format version and the per-layer plan."""

    def __init__(self, plan: dict[str, dict] | None = None, format_version: int = fmt.FORMAT_VERSION,
                 recipe: str | None = None, **kwargs: Any) -> None:
        self.quant_method = fmt.QUANT_METHOD
        self.format_version = format_version
        self.recipe = recipe
        self.plan = plan or {}
        for k, v in kwargs.items():  # informational extras (e.g. average bits) survive a round trip
            setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CompressHfQuantizer(HfQuantizer):
    requires_calibration = True  # checkpoints come from the `compress` pipeline, not from loading

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        try:
            v = int(self.quantization_config.format_version)
        except (TypeError, ValueError):
            raise CompressError(f"config.json has an invalid format_version "
                                f"{self.quantization_config.format_version!r}; the checkpoint is damaged") from None
        if v > fmt.FORMAT_VERSION:
            raise CompressError(f"checkpoint format version {v} is newer than this compress "
                                f"(reads up to {fmt.FORMAT_VERSION}); upgrade compress")

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        """Swap the planned Linears in, then check the files against this skeleton before a byte is loaded:
        every expected tensor with its dtype and shape, nothing unexpected, and (unless disabled) checksums."""
        qc = self.quantization_config
        verify.swap_plan(model, qc.plan, getattr(qc, "unfused_experts", None))
        if checkpoint_files:
            files = [Path(f) for f in checkpoint_files]
            verify.check_folder(files[0].parent, model, files)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        verify.check_finite(model)
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register with transformers once per process (idempotent)."""
    if fmt.QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(fmt.QUANT_METHOD)(CompressConfig)
    if fmt.QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(fmt.QUANT_METHOD)(CompressHfQuantizer)
