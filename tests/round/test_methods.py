"""Properties every rounding method in `compress.round.METHODS` must have, checked for each entry on several grids.

A method added to METHODS is picked up here without editing this file (with its default Config, on the
uniform grids; list other grids in `GRIDS_OF`, other configs in `CONFIGS_OF`). For each per-layer method,
config and grid:

(a) the packed layer decodes to the method's own result: `CompressedLinear.from_weight(lw).dequantize()`
    equals `lw.dequantize()` bit for bit (the LayerWeight invariant the checkpoint relies on);
(b) every code fits its column's width: 0 <= code < 2**bits (and stored zero points are grid codes too);
(c) on a Hessian with planted outlier columns (a few inputs with 100x the activation scale), the layer loss
    ½·tr(ΔHΔᵀ), Δ = W − Ŵ, is at most RTN's on the same grid; strictly below it for methods that use the
    Hessian (`Config.needs_hessian`), equal for RTN itself. For binary grids "RTN" is PB-LLM without error
    feedback, the paper's round-to-nearest rows (rtn.py does not binarize). GPTQ in its natural column order
    (the Config default; every shipped gptq recipe sets act_order) does not meet this on 2-bit grouped grids:
    those cases are marked xfail (strict, so that a fix shows), see `KNOWN_ABOVE_RTN`.

Joint methods (`compress.round.joint`: DiscQuant) have no per-layer `apply`; they must say so, and their
`round_model` output on a tiny model is held to (a) and (b). (c) does not apply to them: they minimise the
end-to-end KL, not the layer loss (tests/round/test_discquant.py checks the KL ends below RTN's).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import pytest
import torch
from helpers import SMALL, tiny_llama

import compress
from compress import data, recipe
from compress.errors import CompressError
from compress.nn import CompressedLinear
from compress.pipeline import make_plan
from compress.plan import LayerSpec, LayerWeight
from compress.round import METHODS, gptq, joint, pbllm, rtn
from compress.round.loss import layer_loss

N, K = 32, 160  # K = 2.5 x 64: a narrower last group, as SmolLM2's 576 with g128
OUTLIERS = (5, 37, 90, 141)  # input channels with 100x the activation scale

UNIFORM = [LayerSpec(bits=b, group_size=g, symmetric=s) for b in (2, 3, 4) for g in (64, -1) for s in (True, False)]
UNIFORM.append(LayerSpec(bits=(2, 4, 3), group_size=64, symmetric=False))  # one width per group
BINARY = [LayerSpec(bits=1, group_size=g, binary=True, salient=f) for g in (64, -1) for f in (0.0, 0.05, 0.2)]
GRIDS_OF: dict[str, list[LayerSpec]] = {"pbllm": BINARY + UNIFORM}  # PB-LLM rounds non-binary specs with GPTQ
CONFIGS_OF: dict[str, dict[str, Any]] = {  # besides the default: the setting every gptq recipe ships with
    "gptq": {"natural": gptq.Config(), "act-order": gptq.Config(act_order=True)},
    "pbllm": {"natural": pbllm.Config(), "act-order": pbllm.Config(act_order=True)},
}

PER_LAYER = [name for name in METHODS if not joint(name)]
JOINT = [name for name in METHODS if joint(name)]


def grid_id(spec: LayerSpec) -> str:
    bits = "-".join(map(str, spec.bits)) if isinstance(spec.bits, tuple) else str(spec.bits)
    g = "row" if spec.group_size == -1 else f"g{spec.group_size}"
    if spec.binary:
        return f"binary-{g}-salient{spec.salient:g}"
    return f"w{bits}-{g}-{'sym' if spec.symmetric else 'asym'}"


def configs(name: str, spec: LayerSpec) -> dict[str, Any]:
    """The configs a method is tested with on `spec`: act-order is a GPTQ knob (binary layers ignore it)."""
    cfgs = CONFIGS_OF.get(name, {"default": METHODS[name].Config()})
    return {"default": pbllm.Config()} if spec.binary else cfgs


KNOWN_ABOVE_RTN = ("natural-order GPTQ on 2-bit groups with outlier inputs: ~1.14x RTN's loss here (dynamic groups are "
                   "fitted before the error of the columns in front of a loud one lands on it); act-order is below")


def known_above_rtn(cfg_id: str, spec: LayerSpec) -> bool:
    return cfg_id == "natural" and spec.bits == 2 and spec.group_size != -1


def case(name: str, cfg_id: str, cfg: Any, spec: LayerSpec, loss: bool = False) -> Any:
    known = loss and known_above_rtn(cfg_id, spec)
    marks = [pytest.mark.xfail(raises=AssertionError, strict=True, reason=KNOWN_ABOVE_RTN)] if known else []
    return pytest.param(name, cfg, spec, id=f"{name}-{cfg_id}-{grid_id(spec)}", marks=marks)


def cases(loss: bool = False) -> list[Any]:
    return [case(name, cfg_id, cfg, spec, loss) for name in PER_LAYER for spec in GRIDS_OF.get(name, UNIFORM)
            for cfg_id, cfg in configs(name, spec).items()]


def outlier_hessian(seed: int = 0) -> torch.Tensor:
    """2/n XᵀX [K, K] of correlated inputs whose OUTLIERS channels are 100x louder than the rest."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, K, generator=g) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g) / K**0.5)
    X[:, list(OUTLIERS)] *= 100
    return 2 * X.T @ X / len(X)


def dense_weight(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.02 + 0.01 * torch.randn(N, 1, generator=g)


def rounded(name: str, cfg: Any, spec: LayerSpec, H: torch.Tensor) -> LayerWeight:
    method: ModuleType = METHODS[name]
    return method.apply(LayerWeight(dense_weight(), spec), H, cfg)


def nearest(spec: LayerSpec, H: torch.Tensor) -> LayerWeight:
    """Round-to-nearest on `spec`'s grid: RTN, or PB-LLM without error feedback for binary grids."""
    if spec.binary:
        return pbllm.apply(LayerWeight(dense_weight(), spec), H, pbllm.Config(feedback=False))
    return rtn.apply(LayerWeight(dense_weight(), spec), H, rtn.Config())


@pytest.fixture(scope="module")
def H() -> torch.Tensor:
    return outlier_hessian()


def assert_codes_fit(lw: LayerWeight) -> None:
    assert lw.codes is not None and lw.codes.dtype == torch.uint8 and lw.codes.shape == lw.W.shape
    width = lw.spec.column_bits(lw.W.shape[1])  # [K]
    assert bool((lw.codes.long() < 2**width).all()), "a code is wider than its column's bits"
    if not (lw.spec.binary or lw.spec.symmetric or lw.spec.levels is not None):
        gw = torch.tensor(lw.spec.group_bits(lw.W.shape[1]))  # [G]
        zero = lw.zero
        assert zero is not None and bool((zero == zero.round()).all())
        assert bool(((zero >= 0) & (zero < 2**gw)).all()), "a zero point is off the grid"


def test_every_method_has_the_interface_and_is_tested_here() -> None:
    for method in METHODS.values():
        assert dataclasses.is_dataclass(method.Config) and callable(method.apply)
        assert isinstance(method.Config().needs_hessian, bool)  # (c) reads it
    assert {p.values[0] for p in cases()} == set(PER_LAYER) and {"rtn", "gptq", "pbllm"} <= set(PER_LAYER)
    assert JOINT == ["discquant"], "a new joint method: give it a round_model test like DiscQuant's below"


@pytest.mark.parametrize(("name", "cfg", "spec"), cases())
def test_the_packed_layer_decodes_to_the_methods_result(name: str, cfg: Any, spec: LayerSpec,
                                                        H: torch.Tensor) -> None:
    lw = rounded(name, cfg, spec, H)
    assert torch.equal(CompressedLinear.from_weight(lw).dequantize(), lw.dequantize())


@pytest.mark.parametrize(("name", "cfg", "spec"), cases())
def test_codes_fit_their_column_widths(name: str, cfg: Any, spec: LayerSpec, H: torch.Tensor) -> None:
    assert_codes_fit(rounded(name, cfg, spec, H))


@pytest.mark.parametrize(("name", "cfg", "spec"), cases(loss=True))
def test_layer_loss_is_at_most_rtns_with_outlier_inputs(name: str, cfg: Any, spec: LayerSpec,
                                                        H: torch.Tensor) -> None:
    W = dense_weight()
    loss = layer_loss(W, rounded(name, cfg, spec, H).dequantize(), H)
    base = layer_loss(W, nearest(spec, H).dequantize(), H)
    if cfg.needs_hessian:
        assert loss < base, (loss, base)
    else:
        assert loss <= base, (loss, base)


# --- joint methods -----------------------------------------------------------------------------------------

JOINT_GRIDS = [LayerSpec(bits=3, group_size=16, symmetric=True), LayerSpec(bits=2, group_size=-1, symmetric=False),
               LayerSpec(bits=4, group_size=32, symmetric=False)]
SHORT = ["round.steps=4", "round.windows_per_step=2", "round.warmup=1", "round.log_every=4"]


@pytest.mark.parametrize("name", JOINT)
def test_joint_methods_refuse_per_layer_apply(name: str) -> None:
    spec = LayerSpec(bits=3, group_size=64)
    with pytest.raises(CompressError, match="whole model"):
        METHODS[name].apply(LayerWeight(dense_weight(), spec), None, METHODS[name].Config())


@pytest.mark.parametrize("spec", JOINT_GRIDS, ids=grid_id)
def test_discquant_layers_decode_exactly_and_fit_their_widths(spec: LayerSpec) -> None:
    m = tiny_llama()
    rec = recipe.load("discquant-3bit", [*SMALL, *SHORT, f"weights.bits={spec.bits}",
                                         f"weights.group_size={spec.group_size}",
                                         f"weights.symmetric={str(spec.symmetric).lower()}"])
    ids = data.calibration(None, "random", 8, 32, vocab_size=m.config.vocab_size).ids
    plan = make_plan(m, compress.models.arch_of(m), rec)
    weights, _ = METHODS["discquant"].round_model(m, plan, ids, rec.round.config)
    assert set(weights) == set(plan.layers)
    for lw in weights.values():
        assert lw.spec.bits == spec.bits and lw.spec.group_size == spec.group_size
        assert_codes_fit(lw)
        assert torch.equal(CompressedLinear.from_weight(lw).dequantize(), lw.dequantize())
