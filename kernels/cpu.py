"""CPU fast path: lower group-wise codes of width <= 4 to PyTorch's int4 CPU matmul (tinygemm layout).

tinygemm decodes w = (q − 8)·scale' + zero' per group of g' columns. Our grid is w = (q − z)·s; with
codes shifted per group, q' = q − d, it is reproduced by scale' = s, zero' = (8 − z + d)·s for any integer d
keeping q' in [0, 15] (kernels.md §6 uses d = 0). We take d = z − 8 clamped to that range, so zero' = 0
whenever the codes allow it (always for widths ≤ 3): only the bf16 rounding of the scale remains, instead
of a bf16-rounded (8 − z)·s shared by every weight of the group. Mixed widths inside a layer lower too.
g' is the largest of {256, 128, 64, 32} dividing the layer's group width, preferring one that also divides K
(a scale is repeated over its g'-subgroups: 128-wide groups run as g' = 64 on K = 576); otherwise K is
padded to a multiple of g' (padded activations are zero). N is padded to a multiple of 16.

The kernel wants bf16 activations (fp32 ones are several times slower than a dense matmul), so the
dispatcher uses this path by default only for bf16 inputs; fp32 models keep the exact reference unless
COMPRESS_KERNEL=cpu asks for it. Memory: 4 bits per weight for the prepared copy, whatever the width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

GROUPS = (256, 128, 64, 32)


@dataclass
class Prepared:
    packed: Tensor  # uint8 [Np, Kp / 2], tinygemm's CPU int4 layout (N padded to a multiple of 16)
    scales_zeros: Tensor  # bf16 [Kp / g', Np, 2]: (scale', zero') per group of g' columns
    group: int  # g'
    K: int
    Kp: int
    N: int


def unsupported(layer: object) -> str | None:
    """Why this layer cannot take the int4 CPU path, or None when it can."""
    spec = layer.spec  # type: ignore[attr-defined]
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu (needs >= 2.6)"
    if spec.levels is not None:
        return "per-column level grids (BAQ faithful mode) are not group-wise"
    if spec.binary:
        return "binary (PB-LLM) layers have no int4 lowering yet"
    K = layer.in_features  # type: ignore[attr-defined]
    if max(spec.group_bits(K)) > 4:
        return "codes wider than 4 bits do not fit int4"
    if not any(spec.group_width(K) % g == 0 for g in GROUPS):
        return f"group width {spec.group_width(K)} is not a multiple of 32"
    return None


ROWS = 256  # rows converted at a time: the packer's layout is row-blocked (any multiple of 64 rows agrees)


def prepare(layer: object) -> Prepared:
    """The tinygemm copy of a CompressedLinear (done once, at the first CPU forward).

    Rows are shifted and converted ROWS at a time, so the int32 staging the packer needs stays below a
    megabyte instead of 4 bytes per weight of the layer (which fragmented the heap of a decoding process)."""
    spec, K = layer.spec, layer.in_features  # type: ignore[attr-defined]
    gw = spec.group_width(K)
    fits = [g for g in GROUPS if gw % g == 0]
    g = next((g for g in fits if K % g == 0), fits[0])  # a g' that also divides K needs no padding
    Kp = -(-K // g) * g
    codes = layer.codes()  # type: ignore[attr-defined]  # uint8 [N, K]
    N = codes.shape[0]
    Np = -(-N // 16) * 16  # the packer wants N % 16 == 0: padded rows are dropped from the output
    src = torch.arange(Kp // g) * g // gw  # the layer group of each tinygemm group
    s = F.pad(layer.scale.float()[:, src], (0, 0, 0, Np - N))  # type: ignore[attr-defined]  # [Np, G']
    z = F.pad(layer.zero_points()[:, src], (0, 0, 0, Np - N)).round().to(torch.int32)  # type: ignore[attr-defined]
    d = torch.empty_like(z)
    packed = torch.empty(Np, Kp // 2, dtype=torch.uint8)
    for r in range(0, Np, ROWS):
        zr = z[r : r + ROWS]
        q = zr.repeat_interleave(g, dim=1)  # [rows, Kp] int32; padding holds each group's zero (decodes to 0)
        n = min(N - r, len(zr))
        if n > 0:
            q[:n, :K] = codes[r : r + n]
        qg = q.view(len(zr), Kp // g, g)
        # Shift each group's codes by d so that tinygemm's zero' = (8 - z + d)·s vanishes where the codes allow
        # (always for widths <= 3): a large zero' would lose its low bits to bf16 in every weight of the group.
        d[r : r + ROWS] = (zr - 8).clamp(min=qg.amax(-1) - 15).minimum(qg.amin(-1))
        qg -= d[r : r + ROWS].unsqueeze(-1)
        packed[r : r + ROWS] = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([s.T, ((8 - z + d) * s).T], dim=-1).to(torch.bfloat16).contiguous()
    return Prepared(packed, sz, g, K, Kp, N)


def linear(layer: object, x: Tensor) -> Tensor:
    """y = x Ŵᵀ + b through the int4 CPU kernel; computed with bf16 activations, returned in x's dtype."""
    p: Prepared | None = getattr(layer, "_cpu_prepared", None)
    if p is None:
        p = prepare(layer)
        layer._cpu_prepared = p  # type: ignore[attr-defined]
    shape = x.shape
    x2 = x.reshape(-1, p.K)
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    if p.Kp != p.K:
        x2 = F.pad(x2, (0, p.Kp - p.K))
    y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), p.packed, p.group, p.scales_zeros)  # [M, Np]
    if y.shape[1] != p.N:
        y = y[:, : p.N]
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    y = y.reshape(*shape[:-1], p.N)
    bias = layer.bias  # type: ignore[attr-defined]
    return y if bias is None else y + bias.to(x.dtype)



