"""Uniform affine grids: choose scale/zero, quantize, dequantize. Pure functions, fp32 math.

Grid of one group x (a row, or a row slice of `group_size` columns), GPTQ's min-max rule:

    xmin = min(min x, 0), xmax = max(max x, 0)      # the range always holds 0
    asymmetric: scale = (xmax - xmin) / maxq,  zero = round(-xmin / scale)
    symmetric:  xmax = max(|xmin|, xmax), scale = 2 xmax / maxq, zero = (maxq + 1) / 2
    q = clamp(round(x / scale) + zero, 0, maxq),  x_hat = scale * (q - zero)

with maxq = 2**bits - 1. The symmetric grid is GPTQ's (3-bit: codes 0..7 mean -4s..+3s), not the
+-(2**(b-1) - 1) grid. Scales are rounded to their storage dtype *before* the zero point and the codes
are computed, so every method quantizes against exactly the grid that the checkpoint stores.

Groups run along K; `expand` maps [N, G] group parameters to [N, K] columns, a narrower last group
included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def maxq(bits: int | Tensor) -> int | Tensor:
    return 2**bits - 1


def expand(t: Tensor, group_size: int, K: int) -> Tensor:
    """[N, G] per-group values -> [N, K] per-column values (group of column k is k // group_size)."""
    return t.repeat_interleave(group_size, dim=1)[:, :K]


def choose_qparams(x: Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Min-max grid for each row of x [N, k] -> (scale [N], zero [N]), both fp32."""
    x = x.float()
    zeros = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(dim=1).values, zeros)
    xmax = torch.maximum(x.max(dim=1).values, zeros)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)  # an all-zero group: any grid reproduces it; avoid scale 0
    xmin, xmax = xmin.masked_fill(empty, -1.0), xmax.masked_fill(empty, 1.0)
    scale = ((xmax - xmin) / maxq(bits)).to(scale_dtype).float()
    scale = scale.clamp_min(torch.finfo(scale_dtype).tiny)  # storage rounding must not leave a 0 scale
    if symmetric:
        zero = torch.full_like(scale, float((maxq(bits) + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq(bits))
    return scale, zero


CLIP = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # shrink factors of the min-max range that `clip` tries


def clip(x: Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype, weight: Tensor | None = None
         ) -> tuple[Tensor, Tensor]:
    """The grid of each row of x [N, k] whose range is the min-max range shrunk by the factor in CLIP that minimises
    the weighted squared rounding error Σ_j weight_j (x_j - x̂_j)² (weight [k]: e.g. diag H, the Hessian's
    weighting; None: plain), after the scale's storage rounding. Factor 1 is the min-max grid, so the error is
    never larger than `choose_qparams`'."""
    x = x.float()
    w = torch.ones(x.shape[1], device=x.device) if weight is None else weight.float().to(x.device)
    best_s, best_z = choose_qparams(x, bits, symmetric, scale_dtype)
    best = _rounding_error(x, best_s, best_z, bits, w)
    zeros = torch.zeros(x.shape[0], device=x.device)
    xmin0, xmax0 = torch.minimum(x.min(dim=1).values, zeros), torch.maximum(x.max(dim=1).values, zeros)
    for a in CLIP[1:]:
        s, z = choose_qparams(torch.stack([xmin0 * a, xmax0 * a], 1), bits, symmetric, scale_dtype)
        err = _rounding_error(x, s, z, bits, w)
        better = err < best
        best = torch.where(better, err, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def _rounding_error(x: Tensor, scale: Tensor, zero: Tensor, bits: int, w: Tensor) -> Tensor:
    q = quantize(x, scale[:, None], zero[:, None], maxq(bits))
    return ((x - dequantize(q, scale[:, None], zero[:, None])) ** 2 * w).sum(dim=1)


def quantize(x: Tensor, scale: Tensor, zero: Tensor, qmax: int | Tensor) -> Tensor:
    """Codes (fp32, integer-valued) in [0, qmax] of x on the grid; scale/zero/qmax broadcast against x.
    A zero scale (a single-level column) has only the code `zero`."""
    q = torch.round(x / scale) + zero
    q = q.clamp(0, qmax) if isinstance(qmax, int) else torch.minimum(q.clamp_min(0), qmax)
    return torch.where(scale == 0, zero, q) if bool((scale == 0).any()) else q


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return scale * (q - zero)


def per_group(bits: int | Sequence[int], G: int) -> list[int]:
    return [bits] * G if isinstance(bits, int) else list(bits)


def choose_qparams_groups(
    W: Tensor, bits: int | Sequence[int], group_size: int, symmetric: bool, scale_dtype: torch.dtype,
    weight: Tensor | None = None, search: bool = False,
) -> tuple[Tensor, Tensor]:
    """Min-max grid per group of W [N, K] -> (scale [N, G], zero [N, G]); bits may differ per group. With `search`,
    each group's range is `clip`ped under the column weights `weight` [K]."""
    K = W.shape[1]
    gb = per_group(bits, n_groups(K, group_size))

    def fit(g: int, b: int) -> tuple[Tensor, Tensor]:
        cols = slice(g * group_size, (g + 1) * group_size)
        if search:
            return clip(W[:, cols], b, symmetric, scale_dtype, None if weight is None else weight[cols])
        return choose_qparams(W[:, cols], b, symmetric, scale_dtype)

    params = [fit(g, b) for g, b in enumerate(gb)]
    return torch.stack([s for s, _ in params], 1), torch.stack([z for _, z in params], 1)


def quantize_groups(W: Tensor, scale: Tensor, zero: Tensor, bits: int | Sequence[int], group_size: int) -> Tensor:
    """W [N, K] with per-group scale/zero [N, G] (and widths) -> codes uint8 [N, K]."""
    K = W.shape[1]
    qmax = maxq(bits) if isinstance(bits, int) else maxq(expand(torch.tensor([list(bits)]), group_size, K))
    q = quantize(W.float(), expand(scale, group_size, K), expand(zero, group_size, K), qmax)
    return q.to(torch.uint8)


def dequantize_groups(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """codes [N, K] with per-group scale/zero [N, G] -> fp32 [N, K]. The reference decode."""
    K = codes.shape[1]
    return dequantize(codes.float(), expand(scale.float(), group_size, K), expand(zero.float(), group_size, K))


def n_groups(K: int, group_size: int) -> int:
    return math.ceil(K / group_size)


def levels_grid(rng: Tensor, rmin: Tensor, levels: Sequence[int]) -> tuple[Tensor, Tensor]:
    """BAQ's per-column grids from a row's range: (scale [N, K], zero [N, K]) for level counts M_j.

    scale = (xmax - xmin) / (M_j - 1), zero = round(-xmin / scale) clamped to the codes; a column with
    M_j = 1 gets scale 0 (it is zero).
    """
    m = torch.tensor(levels, dtype=torch.float32, device=rng.device)  # [K]
    steps = (m - 1).clamp_min(1)
    scale = (rng.float() / steps) * (m > 1)  # [N, K]
    zero = torch.round(-rmin.float() / scale.where(scale > 0, torch.ones_like(scale)))
    return scale, torch.minimum(zero.clamp_min(0), m - 1)


def choose_range(W: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-row min-max range holding 0, rounded to the storage dtype: (xmax - xmin [N, 1], xmin [N, 1])."""
    zeros = torch.zeros(W.shape[0], device=W.device)
    xmin = torch.minimum(W.float().min(dim=1).values, zeros).to(scale_dtype).float()
    xmax = torch.maximum(W.float().max(dim=1).values, zeros)
    rng = (xmax - xmin).to(scale_dtype).float().clamp_min(torch.finfo(scale_dtype).tiny)
    return rng.unsqueeze(1), xmin.unsqueeze(1)
