"""`CompressedLinear`: a Linear that keeps its weight packed (see `format.py`). `forward` goes through the
kernel dispatch (compress.kernels); `dequantize` is the reference decode every kernel is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from compress import format as fmt
from compress import grid
from compress.plan import LayerSpec, LayerWeight, Plan, Salient


class CompressedLinear(nn.Module):
    """y = x Ŵᵀ + b with Ŵ decoded from packed codes.

    Buffers (N = out_features, K = in_features, b = bits, G = groups):
        qweight  int32 [N, ceil(K/32)·b]   bit-plane packed codes
        scale    spec.scale_dtype [N, G]   kept in its storage dtype through model.to(dtype)
        zero     uint8 [N, G]              asymmetric grids only
    """

    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        N, K, G = out_features, in_features, spec.groups(in_features)
        words = fmt.layer_words(spec, K)
        sdt = spec.torch_scale_dtype
        self.register_buffer("qweight", torch.zeros(N, words, dtype=torch.int32, device=device))
        self.register_buffer("scale", torch.ones(N, G, dtype=sdt, device=device))
        if spec.binary:  # PB-LLM: mu per group, and the salient part sized by the plan (format.py)
            self.register_buffer("mu", torch.zeros(N, G, dtype=sdt, device=device))
            if spec.signs == "mst":  # the signs as a tree over the rows (qweight is empty)
                self.register_buffer("mst_parent", torch.zeros(N, dtype=fmt.index_dtype(N), device=device))
                self.register_buffer("mst_rowptr", torch.zeros(N + 1, dtype=torch.int32, device=device))
                self.register_buffer("mst_col", torch.zeros(spec.edges, dtype=fmt.index_dtype(K), device=device))
            if spec.nnz > 0:
                index = spec.index or fmt.choose_index(N, K, spec.nnz)
                if index == "bitmask":
                    self.register_buffer("salient_mask", torch.zeros(N, fmt.packed_words(K, 1), dtype=torch.int32,
                                                                     device=device))
                else:
                    self.register_buffer("salient_rowptr", torch.zeros(N + 1, dtype=torch.int32, device=device))
                    self.register_buffer("salient_col", torch.zeros(spec.nnz, dtype=fmt.index_dtype(K), device=device))
                self.register_buffer("salient_q", torch.zeros(spec.nnz, dtype=torch.uint8, device=device))
                self.register_buffer("salient_scale", torch.ones(N, 1, dtype=sdt, device=device))
                self.register_buffer("salient_zero", torch.zeros(N, 1, dtype=torch.uint8, device=device))
        elif spec.levels is not None:  # BAQ's per-column levels: scale = row range, rmin = row minimum
            self.register_buffer("rmin", torch.zeros(N, 1, dtype=spec.torch_scale_dtype, device=device))
        elif not spec.symmetric:
            self.register_buffer("zero", torch.zeros(N, G, dtype=torch.uint8, device=device))
        if spec.sparse:  # pruned: qweight holds the kept codes only
            self.register_buffer("keep_mask", torch.zeros(N, fmt.packed_words(K, 1), dtype=torch.int32,
                                                          device=device))
        self.bias = nn.Parameter(torch.zeros(N, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_weight(cls, lw: LayerWeight, bias: Tensor | None = None) -> CompressedLinear:
        """Pack a rounded `LayerWeight` (codes + grid) into a module on the weight's device."""
        N, K = lw.W.shape
        m = cls(K, N, lw.spec, bias=bias is not None, device=lw.W.device, dtype=None if bias is None else bias.dtype)
        if lw.spec.sparse:
            if lw.keep is None:
                raise ValueError("a pruned layer needs its keep mask")
            qweight, keep_mask = fmt.pack_sparse(lw.codes, lw.keep, lw.spec)
            m.qweight.copy_(qweight)
            m.keep_mask.copy_(keep_mask)
        elif lw.spec.binary and lw.spec.signs == "mst":
            from compress import mst

            tree = mst.build(lw.codes.bool().cpu())
            for k, v in fmt.pack_mst(tree.parent, tree.diffs, K).items():
                if v.numel() != getattr(m, k).numel():
                    raise ValueError(f"the plan's MST edges={lw.spec.edges} do not match the signs' tree ({v.numel()})")
                getattr(m, k).copy_(v)
        else:
            m.qweight.copy_(fmt.pack_layer(lw.codes, lw.spec))
        m.scale.copy_(lw.scale.to(lw.spec.torch_scale_dtype))
        if lw.spec.binary:
            m.mu.copy_(lw.zero.to(lw.spec.torch_scale_dtype))
            if lw.spec.nnz > 0:
                sal = lw.salient
                if sal is None or int(sal.mask.sum()) != lw.spec.nnz:
                    raise ValueError("a binary layer's salient part must hold spec.nnz weights")
                index = lw.spec.index or fmt.choose_index(N, K, lw.spec.nnz)
                for k, v in fmt.pack_salient(sal.mask, sal.codes, index).items():
                    getattr(m, k).copy_(v)
                m.salient_scale.copy_(sal.scale.to(lw.spec.torch_scale_dtype))
                m.salient_zero.copy_(sal.zero.to(torch.uint8))
        elif lw.spec.levels is not None:
            m.rmin.copy_(lw.zero.to(lw.spec.torch_scale_dtype))
        elif not lw.spec.symmetric:
            m.zero.copy_(lw.zero.to(torch.uint8))
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def codes(self) -> Tensor:
        if self.spec.sparse:  # pruned positions hold their group's zero code: they decode to 0
            K, gw = self.in_features, self.spec.group_width(self.in_features)
            fill = grid.expand(self.zero_points(), gw, K).round()
            return fmt.unpack_sparse(self.qweight, self.keep_mask, self.spec, K, fill)
        if self.spec.binary and self.spec.signs == "mst":  # decoded once (a walk over the rows), then cached
            if "_mst_signs" not in self.__dict__:
                t = {k: getattr(self, k) for k in ("mst_parent", "mst_rowptr", "mst_col")}
                self.__dict__["_mst_signs"] = fmt.unpack_mst(t, self.in_features).to(torch.uint8)
            return self.__dict__["_mst_signs"]
        return fmt.unpack_layer(self.qweight, self.spec, self.in_features)

    def zero_points(self) -> Tensor:
        if self.spec.binary:
            raise ValueError("binary layers have mu, not zero points")
        if self.spec.symmetric:  # GPTQ's symmetric grid: zero = 2**(bits-1) in every group
            gb = torch.tensor(self.spec.group_bits(self.in_features), device=self.scale.device)
            return (2.0 ** (gb - 1)).expand(self.out_features, -1)
        return self.zero.float()

    def salient_part(self) -> Salient | None:
        """PB-LLM's 8-bit part of a binary layer, decoded from its index (None when there is none)."""
        if not self.spec.binary or self.spec.nnz <= 0:
            return None
        index = self.spec.index or fmt.choose_index(self.out_features, self.in_features, self.spec.nnz)
        t = {k: getattr(self, k) for k in ("salient_mask", "salient_rowptr", "salient_col", "salient_q")
             if hasattr(self, k)}
        mask, codes = fmt.unpack_salient(t, index, self.out_features, self.in_features)
        return Salient(mask, codes, self.salient_scale.float(), self.salient_zero.float())

    def dequantize(self) -> Tensor:
        """Ŵ fp32 [N, K]: the reference decode that every kernel must match."""
        if self.spec.binary:
            K, gw = self.in_features, self.spec.group_width(self.in_features)
            sign = 2 * self.codes().float() - 1
            W = grid.expand(self.mu.float(), gw, K) + grid.expand(self.scale.float(), gw, K) * sign
            sal = self.salient_part()
            return W if sal is None else sal.apply(W)
        if self.spec.levels is not None:
            s, z = grid.levels_grid(self.scale, self.rmin, self.spec.levels)
            return grid.dequantize(self.codes().float(), s, z)
        return grid.dequantize_groups(self.codes(), self.scale, self.zero_points(),
                                      self.spec.group_width(self.in_features))

    def forward(self, x: Tensor) -> Tensor:
        from compress import kernels  # CUDA → Triton → CPU int4 → reference (compress/kernels = kernels/)

        return kernels.linear(self, x)

    def _drop_kernel_state(self) -> None:
        """Forget kernel-side copies and the cached backend choice (new codes, or a new device)."""
        for k in ("_cpu_prepared", "_cpu_gemv", "_cpu_binary", "_parts", "_backend", "_mst_signs", "_binary"):
            self.__dict__.pop(k, None)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self._drop_kernel_state()
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> CompressedLinear:
        # model.to(bfloat16) must move scales but never round them: keep their storage dtype.
        kept = {k: getattr(self, k) for k in ("scale", "rmin", "mu", "salient_scale") if hasattr(self, k)}
        self._drop_kernel_state()  # kernel-side copies are rebuilt where the module lands
        super()._apply(fn, recurse)
        for k, t in kept.items():
            if getattr(self, k).dtype != t.dtype:
                setattr(self, k, t.to(self.qweight.device))
        return self

    def extra_repr(self) -> str:
        s = self.spec
        g = "row" if s.group_size == -1 else s.group_size
        bits = s.bits if isinstance(s.bits, int) else "/".join(map(str, sorted(set(s.bits))))
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={bits}, group={g}, "
                f"{'sym' if s.symmetric else 'asym'}, bias={self.bias is not None}")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def swap_linears(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace every Linear named in `plan` by an empty `CompressedLinear` (works on the meta device)."""
    for name in plan:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is {type(lin).__name__}, expected nn.Linear")
        dev = lin.weight.device
        dtype = lin.weight.dtype
        set_module(model, name, CompressedLinear(lin.in_features, lin.out_features, plan[name],
                                                 bias=lin.bias is not None, device=dev, dtype=dtype))
    return model
