"""What the rounding passes report, block by block: shared by the sequential driver, the allocators that
measure with it, and the CLI's live table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from compress.nn import CompressedLinear
    from compress.plan import LayerSpec


@dataclass
class LayerReport:
    name: str
    loss: float  # the method's layer loss (GPTQ: OBQ estimate of ½·tr(ΔW H ΔWᵀ)); nan if no Hessian
    seconds: float
    info: dict[str, float] = field(default_factory=dict)
    col_loss: Tensor | None = None  # [K] per-column loss on CPU (what BAQ allocates from)
    numel: int = 0


@dataclass
class BlockReport:
    index: int
    total: int
    seconds: float
    layers: list[LayerReport]
    resumed: bool = False
    stage: str = "round"  # which pass produced it (e.g. "baq pass 1", "level database", "round")
    info: dict[str, float] = field(default_factory=dict)  # the block's own measures (reconstruction's output error)

    @property
    def loss(self) -> float:
        return sum(r.loss for r in self.layers)


Progress = Callable[[BlockReport], None]
# (name, dense Linear, its Hessian or None, spec) -> (packed module used for propagation, report)
RoundLayer = Callable[[str, nn.Linear, "Tensor | None", "LayerSpec"], "tuple[CompressedLinear, LayerReport]"]
