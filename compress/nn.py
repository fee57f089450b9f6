"""`CompressedLinear`: a Linear that keeps its weight packed, in the tensors of its spec's codec
(compress/codecs/). `forward` goes through the kernel dispatch (compress.kernels); `dequantize` is the
reference decode every kernel is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from torch import Tensor, nn

from compress import codecs
from compress.plan import LayerSpec, LayerWeight, Plan, Salient


class CompressedLinear(nn.Module):
    """y = x Ŵᵀ + b with Ŵ decoded from packed tensors.

    Its buffers are the ones its spec's codec stores (compress/codecs/: affine groups hold qweight int32
    [N, ceil(K/32)·b], scale [N, G] in the spec's scale dtype and, when asymmetric, zero uint8 [N, G]);
    storage dtypes survive model.to(dtype). Everything that depends on the storage kind is the codec's.
    """

    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        for name, (shape, dt) in self.codec.buffers(spec, out_features, in_features).items():
            fill = torch.ones if dt.is_floating_point else torch.zeros
            self.register_buffer(name, fill(shape, dtype=dt, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @property
    def codec(self) -> ModuleType:
        """The module of `compress.codecs` that owns this layer's storage kind."""
        return codecs.of(self.spec)

    @classmethod
    def from_weight(cls, lw: LayerWeight, bias: Tensor | None = None) -> CompressedLinear:
        """Pack a rounded `LayerWeight` (codes + grid) into a module on the weight's device."""
        N, K = lw.W.shape
        m = cls(K, N, lw.spec, bias=bias is not None, device=lw.W.device, dtype=None if bias is None else bias.dtype)
        for name, t in m.codec.pack(lw).items():
            buf = getattr(m, name)
            if t.shape != buf.shape:
                raise ValueError(f"{lw.spec.kind} layer: packed {name} is {tuple(t.shape)}, the spec sizes it "
                                 f"{tuple(buf.shape)}")
            buf.copy_(t)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def packed(self) -> dict[str, Tensor]:
        """The codec's tensors (names without the module prefix)."""
        return {k: getattr(self, k) for k in self.codec.buffers(self.spec, self.out_features, self.in_features)}

    def decoded(self) -> codecs.Decoded:
        """Codes and grid in memory, as the rounding produced them. MST signs (a walk over the rows) are
        decoded once and kept until the buffers change."""
        if "_decoded" in self.__dict__:
            return self.__dict__["_decoded"]
        d = self.codec.unpack(self.packed(), self.spec, self.out_features, self.in_features)
        if self.spec.signs == "mst":
            self.__dict__["_decoded"] = d
        return d

    def codes(self) -> Tensor:
        """The codes uint8 [N, K] (binary layers: the sign bits)."""
        return self.decoded().codes

    def zero_points(self) -> Tensor:
        """The grid's zero points fp32 [N, G] (affine and pruned layers)."""
        if self.spec.kind not in ("affine", "pruned"):
            raise ValueError(f"{self.spec.kind} layers have no group zero points")
        return self.codec.grid(self.packed(), self.spec, self.out_features, self.in_features)[1]

    def salient_part(self) -> Salient | None:
        """PB-LLM's 8-bit part of a binary layer (None when there is none)."""
        return self.decoded().salient

    def dequantize(self) -> Tensor:
        """Ŵ fp32 [N, K]: the reference decode that every kernel must match."""
        return self.codec.dequantize(self.decoded(), self.spec, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        from compress import kernels  # CUDA → Triton → CPU int4 → reference (compress/kernels = kernels/)

        return kernels.linear(self, x)

    def _drop_kernel_state(self) -> None:
        """Forget kernel-side copies and the cached backend choice (new codes, or a new device)."""
        for k in ("_cpu_prepared", "_cpu_gemv", "_cpu_binary", "_parts", "_backend", "_decoded", "_binary",
                  "_dense"):
            self.__dict__.pop(k, None)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self._drop_kernel_state()
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> CompressedLinear:
        # model.to(bfloat16) must move scales but never round them: keep their storage dtype.
        kept = {k: t for k, t in self.packed().items() if t.is_floating_point()}
        self._drop_kernel_state()  # kernel-side copies are rebuilt where the module lands
        super()._apply(fn, recurse)
        for k, t in kept.items():
            if getattr(self, k).dtype != t.dtype:
                setattr(self, k, t.to(getattr(self, k).device))
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


@contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """The model with `modules` in place of its own (e.g. the uniform reference of an allocation), restored after."""
    own = {n: model.get_submodule(n) for n in modules}
    for n, m in modules.items():
        set_module(model, n, m)
    try:
        yield model
    finally:
        for n, m in own.items():
            set_module(model, n, m)


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
