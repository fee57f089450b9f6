"""Kernel dispatch and the CPU int4 path, against the reference decode (the packing spec as a function)."""

from __future__ import annotations

import pytest
import torch
from helpers import IDS, layer, pbllm_layer, run, tiny_llama

from compress import kernels
from compress.errors import CompressError
from compress.kernels import cpu, ops, reference  # ops: declares torch.ops.compress.*
from compress.plan import LayerSpec

SPECS = [
    LayerSpec(bits=4, group_size=128, symmetric=False),  # K = 576: the last group is 64 wide
    LayerSpec(bits=3, group_size=64, symmetric=True),
    LayerSpec(bits=2, group_size=32, symmetric=False),
    LayerSpec(bits=1, group_size=128, symmetric=False),
    LayerSpec(bits=4, group_size=-1, symmetric=False),  # per row: repeated over tinygemm groups
    LayerSpec(bits=(2, 4, 3, 2, 4), group_size=128, symmetric=False),  # mixed widths inside the layer
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"b{s.bits}-g{s.group_size}-{'sym' if s.symmetric else 'asym'}")
def test_width_parts_recombine_to_the_reference(spec: LayerSpec) -> None:
    m = layer(spec)
    x = torch.randn(3, 576)
    expected = x @ m.dequantize().T + m.bias
    got = kernels._by_parts(reference.wq_matmul, m, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"b{s.bits}-g{s.group_size}-{'sym' if s.symmetric else 'asym'}")
@pytest.mark.parametrize("M", [1, 5])
def test_cpu_int4_path_matches_the_reference_within_bf16(spec: LayerSpec, M: int) -> None:
    m = layer(spec)
    assert cpu.unsupported(m) is None
    x = torch.randn(M, 576)
    exact = x @ m.dequantize().T + m.bias
    y = cpu.linear(m, x.bfloat16()).float()
    bf16 = (x.bfloat16().float() @ m.dequantize().bfloat16().float().T + m.bias)  # what bf16 inputs cost anyway
    err, floor = (y - exact).norm() / exact.norm(), (bf16 - exact).norm() / exact.norm()
    assert err < 3 * floor, (err, floor)  # the per-group code shift keeps zero' out of bf16 rounding


@pytest.mark.parametrize("N", [300, 16 * cpu.ROWS + 8])  # row chunks of the packer, N not a multiple of 16
def test_cpu_int4_preparation_in_row_chunks_decodes_every_row(N: int) -> None:
    m = layer(SPECS[0], N=N, K=160, bias=False)  # K = 160: g' = 32 divides it, no K padding
    x = torch.eye(160)  # the identity reads Ŵᵀ back through the kernel
    W = cpu.linear(m, x.bfloat16()).float().T
    ref = m.dequantize()
    assert W.shape == ref.shape
    assert ((W - ref).abs() <= ref.abs().amax(dim=1, keepdim=True) * 2**-7).all()  # bf16 output rounding only


def test_dispatch_takes_the_cpu_backend_for_every_float_dtype_and_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.ENV, raising=False)
    m = layer(SPECS[0])
    assert kernels.choose(m, torch.randn(1, 576)) == "cpu"
    assert kernels.choose(m, torch.randn(1, 576).bfloat16()) == "cpu"
    assert kernels.choose(m, torch.randn(1, 576, dtype=torch.float64)) == "reference"  # fp64 stays exact
    wide = layer(LayerSpec(bits=8, group_size=128, symmetric=False))
    assert kernels.choose(wide, torch.randn(1, 576).bfloat16()) == "cpu"  # 8 bits: the GEMV, not int4


def test_the_cached_choice_follows_dtype_environment_and_new_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.ENV, raising=False)
    m = layer(SPECS[0])
    x = torch.randn(1, 576)
    assert kernels.choose(m, x.bfloat16()) == "cpu"
    assert kernels.choose(m, x.double()) == "reference"  # same layer, other dtype: not the cached answer
    monkeypatch.setenv(kernels.ENV, "reference")
    assert kernels.choose(m, x.bfloat16()) == "reference"
    monkeypatch.delenv(kernels.ENV)
    assert kernels.choose(m, x.bfloat16()) == "cpu"


def test_new_codes_replace_the_kernel_side_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_state_dict() with other codes: the int4 copy made at the first prefill and the cached choice are
    rebuilt, so every path computes with the new codes (a stale copy would give the old layer's output)."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    m, new = layer(SPECS[0]), layer(SPECS[0], seed=1)
    prefill, decode = torch.randn(cpu.GEMV_ROWS + 4, 576).bfloat16(), torch.randn(1, 576).bfloat16()
    assert cpu.path(m, prefill) == "int4" and kernels.choose(m, prefill) == "cpu"
    with torch.no_grad():
        before = m(prefill), m(decode)  # makes the int4 copy and caches the choice
        m.load_state_dict(new.state_dict())
        after, expected = (m(prefill), m(decode)), (new(prefill), new(decode))
    assert kernels.choose(m, prefill) == "cpu"
    for b, a, e in zip(before, after, expected, strict=True):
        assert not torch.equal(a, b) and torch.equal(a, e)


def test_forced_backends_are_honoured_or_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    m = layer(SPECS[0])
    x = torch.randn(2, 576)
    monkeypatch.setenv(kernels.ENV, "cpu")
    assert kernels.choose(m, x) == "cpu"
    torch.testing.assert_close(m(x), cpu.linear(m, x))
    monkeypatch.setenv(kernels.ENV, "cuda")
    with pytest.raises(CompressError, match="COMPRESS_KERNEL=cuda cannot run this layer: the input is not on a CUDA"):
        m(x)
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(CompressError, match="not a backend; choose one of cuda, triton, cpu, reference"):
        m(x)
    monkeypatch.setenv(kernels.ENV, "cpu")
    with pytest.raises(CompressError, match=r"COMPRESS_KERNEL=cpu cannot run this layer: the input is torch\.float64"):
        m(x.double())


def test_bf16_model_logits_through_the_int4_path_stay_close_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    m = tiny_llama()
    run(m, "gptq-4bit")
    m = m.to(torch.bfloat16)
    monkeypatch.setenv(kernels.ENV, "reference")
    with torch.no_grad():
        ref = m(IDS).logits.float()
    monkeypatch.delenv(kernels.ENV)
    with torch.no_grad():
        fast = m(IDS).logits.float()
    assert kernels.choose(m.model.layers[0].mlp.down_proj, torch.zeros(1, 160, dtype=torch.bfloat16)) == "cpu"
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    assert (fast - ref).norm() / ref.norm() < 0.05


# --- the declared ops (kernels/ops.py) ------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS[:5], ids=lambda s: f"b{s.bits}-g{s.group_size}")
def test_wq_matmul_op_is_the_reference_and_traces(spec: LayerSpec) -> None:
    m = layer(spec)
    gw = spec.group_width(576)
    zero = None if spec.symmetric else m.zero
    x = torch.randn(2, 3, 576)
    y = ops.wq_matmul(x, m.qweight, m.scale, zero, spec.bits, gw)
    assert torch.equal(y, torch.ops.compress.wq_matmul(x, m.qweight, m.scale, zero, spec.bits, gw))
    torch.testing.assert_close(y, x @ m.dequantize().T, rtol=1e-5, atol=1e-6)
    # schema, fake (meta) implementation, autograd registration: torch's own consistency checks
    torch.library.opcheck(torch.ops.compress.wq_matmul.default, (x, m.qweight, m.scale, zero, spec.bits, gw))
    with torch.device("meta"):
        fake = torch.ops.compress.wq_matmul(x.to("meta"), m.qweight.to("meta"), m.scale.to("meta"),
                                            None if zero is None else zero.to("meta"), spec.bits, gw)
    assert fake.shape == (2, 3, 40)


@pytest.mark.parametrize("salient", [0.0, 0.05, 0.2])  # none, a CSR index, a bitmask index
def test_binary_operands_and_op_reproduce_the_layer(salient: float) -> None:
    m = pbllm_layer(salient)
    ops = kernels.binary_operands(m)
    assert kernels.binary_operands(m) is ops  # derived once per layer
    assert ops.col.numel() == m.spec.nnz and ops.rowptr[-1] == m.spec.nnz
    W = reference.binary_dequantize(*ops.args()[:4], 200, *ops.args()[4:])
    torch.testing.assert_close(W, m.dequantize(), rtol=0, atol=1e-7)  # mu + alpha·s + delta = the 8-bit value
    x = torch.randn(5, 200)
    y = torch.ops.compress.binary_matmul(x, *ops.args())
    torch.testing.assert_close(y, x @ m.dequantize().T, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.compress.binary_matmul.default, (x, *ops.args()))
    new = pbllm_layer(salient, seed=4)
    assert not torch.equal(new.dequantize(), m.dequantize())
    m.load_state_dict(new.state_dict())  # new codes: the operands are derived again, from them
    again = kernels.binary_operands(m)
    assert again is not ops
    W = reference.binary_dequantize(*again.args()[:4], 200, *again.args()[4:])
    torch.testing.assert_close(W, new.dequantize(), rtol=0, atol=1e-7)
