"""Round-to-nearest on the min-max grid: the calibration-free baseline (GPTQ's `--nearest`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from compress import ggml, grid, prune
from compress.codecs import ggml as ggml_codec
from compress.errors import CompressError
from compress.plan import LayerWeight
from compress.round.loss import column_loss


@dataclass(frozen=True)
class Config:
    needs_hessian: ClassVar[bool] = False  # facts of the method, not recipe knobs
    needs_calibration: ClassVar[bool] = False  # (needs windows without a Hessian: a joint method)


def apply(lw: LayerWeight, H: Tensor | None, cfg: Config) -> LayerWeight:
    """Quantize every group of W [N, K] to its nearest grid point."""
    if lw.spec.kind == "binary":
        raise CompressError("binary layers are rounded by round.method=pbllm (PB-LLM), not rtn")
    spec, W = lw.spec, lw.W.float()
    if spec.kind == "levels":  # BAQ's per-column level counts on the row's range
        scale, zero = grid.choose_range(W, spec.torch_scale_dtype)
        levels = spec.levels or ()
        S, Z = grid.levels_grid(scale, zero, levels)
        codes = grid.quantize(W, S, Z, torch.tensor(levels) - 1).to(torch.uint8)
        out = lw.rounded(codes=codes, scale=scale, zero=zero)
        if H is not None:
            out.loss = column_loss(W, out.dequantize(), H)
        return out
    if spec.kind == "ggml":  # the type's own weighted scale search (weights diag H when given), then nearest
        params = ggml.choose(spec.ggml, W, None if H is None else torch.diag(H))
        out = lw.rounded(codes=ggml.round_nearest(spec.ggml, W, params), scale=params, zero=ggml_codec.no_zero(params))
        if H is not None:
            out.loss = column_loss(W, out.dequantize(), H)
        return out
    gs = spec.group_width(W.shape[1])
    gb = spec.group_bits(W.shape[1])
    keep = None
    if spec.kind == "pruned":  # prune, then quantize what is kept; pruned weights take the zero code
        if spec.prune != "magnitude" and H is None:
            raise CompressError(f"prune={spec.prune} needs calibration statistics; use round.method=gptq "
                                "or prune: magnitude")
        keep = prune.choose(W, spec, torch.diag(H) if H is not None else torch.ones(W.shape[1]), lambda: None)
        W = W * keep
    scale, zero = grid.choose_qparams_groups(W, gb, gs, spec.symmetric, spec.torch_scale_dtype)
    codes = grid.quantize_groups(W, scale, zero, gb, gs)
    if keep is not None:
        codes = torch.where(keep, codes, grid.expand(zero, gs, W.shape[1]).to(torch.uint8))
    out = lw.rounded(codes=codes, scale=scale, zero=zero, keep=keep)
    if H is not None:
        out.loss = column_loss(W, out.dequantize(), H)
    return out
