"""GPTQ against its own algebra and against RTN on the same Hessian."""

from __future__ import annotations

import pytest
import torch

from compress.errors import CompressError
from compress.plan import LayerSpec, LayerWeight
from compress.round import gptq, rtn
from compress.round.loss import layer_loss


def correlated_hessian(K: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, K, generator=g) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g) / K**0.5)
    X[:, :: max(1, K // 8)] *= 8  # a few strong channels, as in LLM activations
    return 2 * X.T @ X / n


def damped(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    return H + damp * torch.diag(H).mean() * torch.eye(H.shape[0])


SETTINGS = [(4, 128, False), (3, 128, False), (2, 64, False), (3, -1, False), (3, 64, True), (4, 32, True)]


SETTING_IDS = [f"w{b}g{g}{'s' if s else 'a'}" for b, g, s in SETTINGS]


@pytest.mark.parametrize(("bits", "group", "sym"), SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
def test_gptq_loss_is_below_rtn_loss_on_the_same_hessian(bits: int, group: int, sym: bool, act_order: bool) -> None:
    K = 320  # 320 = 2.5 x 128: a narrow last group, like SmolLM2's 576
    H = correlated_hessian(K)
    W = torch.randn(48, K, generator=torch.Generator().manual_seed(1))
    spec = LayerSpec(bits=bits, group_size=group, symmetric=sym)
    q = gptq.apply(LayerWeight(W, spec), H, gptq.Config(act_order=act_order))
    r = rtn.apply(LayerWeight(W, spec), H, rtn.Config())
    assert layer_loss(W, q.dequantize(), H) < 0.97 * layer_loss(W, r.dequantize(), H)


def test_reported_loss_equals_the_quadratic_form_of_the_final_error() -> None:
    """Σ_j loss_j = ½ tr(ΔW H_damped ΔWᵀ) exactly: the OBQ bookkeeping is right for every column."""
    H, W = correlated_hessian(200), torch.randn(16, 200)
    for act_order in (False, True):
        q = gptq.apply(LayerWeight(W, LayerSpec(bits=3, group_size=64)), H, gptq.Config(act_order=act_order))
        assert q.info["loss"] == pytest.approx(layer_loss(W, q.dequantize(), damped(H)), rel=1e-4)
        assert float(q.loss.sum()) == pytest.approx(q.info["loss"], rel=1e-6)


@pytest.mark.parametrize(("group", "act_order"), [(-1, False), (64, True)], ids=["per-row", "static-groups"])
def test_lazy_block_updates_equal_eager_updates(group: int, act_order: bool) -> None:
    """With grids fixed up front, the block size only changes when updates are applied, not the result.
    (Dynamic groups are fitted at each block start, as in the reference, so there B is part of the method.)"""
    H, W = correlated_hessian(256), torch.randn(8, 256)
    spec = LayerSpec(bits=3, group_size=group, scale_dtype="float32")
    lazy = gptq.apply(LayerWeight(W, spec), H, gptq.Config(block_size=128, act_order=act_order))
    eager = gptq.apply(LayerWeight(W, spec), H, gptq.Config(block_size=1, act_order=act_order))
    assert torch.equal(lazy.codes, eager.codes)
    torch.testing.assert_close(lazy.dequantize(), eager.dequantize(), rtol=0, atol=1e-5)


def test_worked_example_from_the_docstring() -> None:
    """w = [1, .6, .6] on the 1-bit grid {0, 1}: RTN rounds both .6 up (loss .304); GPTQ moves column 1's
    error into column 2 (.6 - .9·.4 = .24), which then rounds down (loss .044)."""
    W = torch.tensor([[1.0, 0.6, 0.6]])
    H = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.9], [0.0, 0.9, 1.0]])
    spec = LayerSpec(bits=1, group_size=-1, scale_dtype="float32")
    q = gptq.apply(LayerWeight(W, spec), H, gptq.Config(damp=0.0))
    r = rtn.apply(LayerWeight(W, spec), H, rtn.Config())
    torch.testing.assert_close(r.dequantize(), torch.tensor([[1.0, 1.0, 1.0]]))
    torch.testing.assert_close(q.dequantize(), torch.tensor([[1.0, 1.0, 0.0]]))
    assert layer_loss(W, r.dequantize(), H) == pytest.approx(0.304)
    assert layer_loss(W, q.dequantize(), H) == pytest.approx(0.044)


def test_identity_hessian_gives_round_to_nearest() -> None:
    W = torch.randn(8, 128)
    spec = LayerSpec(bits=3, group_size=32)
    q = gptq.apply(LayerWeight(W, spec), torch.eye(128), gptq.Config())
    r = rtn.apply(LayerWeight(W, spec), None, rtn.Config())
    assert torch.equal(q.codes, r.codes)


def test_dead_inputs_are_zeroed() -> None:
    H, W = correlated_hessian(64), torch.randn(4, 64) + 3.0
    H[5, :], H[:, 5] = 0, 0
    q = gptq.apply(LayerWeight(W, LayerSpec(bits=4, group_size=32)), H, gptq.Config())
    assert torch.equal(q.dequantize()[:, 5], torch.zeros(4))


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
@pytest.mark.parametrize("clip", [False, True], ids=["minmax", "clip"])
def test_the_hessian_is_only_read(act_order: bool, clip: bool) -> None:
    """GPTQ factorises a copy (the caller's H, which may be shared by several Linears, is never written), dead
    inputs included."""
    H = correlated_hessian(64)
    H[5, :], H[:, 5] = 0, 0
    before = H.clone()
    gptq.apply(LayerWeight(torch.randn(8, 64), LayerSpec(bits=3, group_size=32)), H,
               gptq.Config(act_order=act_order, clip=clip))
    assert torch.equal(H, before)


def test_the_permuted_factor_is_the_factor_of_the_permuted_hessian() -> None:
    """inverse_cholesky(H, diag=d[perm], perm) is the factor of H[perm][:, perm] with d[perm] on its diagonal, bit for
    bit, from one gather instead of two copies."""
    H = correlated_hessian(48)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    d = torch.diag(H).clone()
    d[7] = 1.0
    Hp = H[perm][:, perm]
    Hp.diagonal().copy_(d[perm])
    U1, damp1 = gptq.inverse_cholesky(Hp, 0.01, 1.0)
    U2, damp2 = gptq.inverse_cholesky(H, 0.01, 1.0, d[perm], perm)
    assert damp1 == damp2 and torch.equal(U1, U2)
    L = torch.linalg.cholesky(Hp + 0.01 * d.mean() * torch.eye(48))  # U is chol_upper((H' + λI)⁻¹)
    torch.testing.assert_close(U1.T @ U1, torch.cholesky_inverse(L), rtol=1e-4, atol=1e-5)


def test_act_order_restores_the_original_column_layout() -> None:
    H = torch.diag(torch.arange(1, 65, dtype=torch.float32))  # act-order = reversed columns
    W = torch.randn(4, 64)
    spec = LayerSpec(bits=8, group_size=16, scale_dtype="float32")
    q = gptq.apply(LayerWeight(W, spec), H, gptq.Config(act_order=True))
    torch.testing.assert_close(q.dequantize(), W, atol=float(q.scale.max()), rtol=0)  # 8 bits: tiny error


def test_singular_hessian_escalates_damping() -> None:
    X = torch.randn(4, 64)  # 4 samples for 64 inputs: rank 4
    H = 2 * X.T @ X / 4
    q = gptq.apply(LayerWeight(torch.randn(8, 64), LayerSpec(bits=4, group_size=32)), H, gptq.Config(damp=0.0))
    assert q.info["damp"] > 0
    assert torch.isfinite(q.dequantize()).all()


def test_a_failed_factorisation_of_the_inverse_escalates_damping(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second factorisation (of the inverse) failing once raises the damping like the first one failing."""
    real, calls = torch.linalg.cholesky_ex, []

    def flaky(A: torch.Tensor, upper: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        L, info = real(A, upper=upper)
        calls.append(upper)
        return (L, torch.tensor(1)) if upper and calls.count(True) == 1 else (L, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    U, damp = gptq.inverse_cholesky(correlated_hessian(32), 0.01, 1.0)
    assert U is not None and damp == 0.1 and calls.count(True) == 2


def test_non_finite_hessian_is_a_clear_error() -> None:
    H = correlated_hessian(32)
    H[3, 3] = float("nan")
    with pytest.raises(CompressError, match="NaN"):
        gptq.apply(LayerWeight(torch.randn(4, 32), LayerSpec(group_size=32)), H, gptq.Config())


@pytest.mark.parametrize("bits,group,act", [(2, 64, True), (3, 128, False), (4, 32, True), (3, -1, False)])
def test_clipping_search_never_raises_the_layer_loss(bits: int, group: int, act: bool) -> None:
    """round.clip: the sweep on searched ranges or on min-max ones, whichever loses less; on heavy-tailed weights
    (Student-t, what LLM weights look like) the search wins somewhere."""
    from helpers import hessian

    from compress import grid

    torch.manual_seed(bits)
    W = torch.distributions.StudentT(3.0).sample((48, 256)) * 0.02
    H = hessian(256, seed=bits)
    spec = LayerSpec(bits=bits, group_size=group)
    plain = gptq.apply(LayerWeight(W, spec), H, gptq.Config(act_order=act))
    clipped = gptq.apply(LayerWeight(W, spec), H, gptq.Config(act_order=act, clip=True))
    assert clipped.info["loss"] <= plain.info["loss"]
    assert torch.equal(clipped.dequantize(), clipped.rounded().dequantize())  # the grid it keeps decodes its codes
    x = W[:, :64]
    s0, z0 = grid.choose_qparams(x, bits, False, torch.float16)
    s1, z1 = grid.clip(x, bits, False, torch.float16, torch.diag(H)[:64])
    err = [float(((x - grid.dequantize(grid.quantize(x, s[:, None], z[:, None], grid.maxq(bits)), s[:, None],
                                       z[:, None])) ** 2 * torch.diag(H)[:64]).sum()) for s, z in ((s0, z0), (s1, z1))]
    assert err[1] < err[0]  # the search's own objective: strictly lower on heavy tails


def asymmetric_problem(K: int = 192, n: int = 1024, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Quantized-model inputs X [n, K] and the dense model's X̃ = X + ΔX for the same tokens (ΔX: the error that the
    earlier layers' quantization left, correlated with X as it is in a model), a weight W, and H, D as the driver
    accumulates them."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, K, generator=g) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g) / K**0.5)
    dX = 0.2 * X @ (torch.randn(K, K, generator=g) / K**0.5) + 0.05 * torch.randn(n, K, generator=g)
    W = torch.randn(32, K, generator=g)
    return X, X + dX, W, 2 * X.T @ X / n, 2 * dX.T @ X / n


def asymmetric_loss(Q: torch.Tensor, W: torch.Tensor, X: torch.Tensor, dense: torch.Tensor) -> float:
    """What GPTAQ minimises: the quantized layer on the quantized model's inputs against the dense layer on the dense
    model's inputs, ‖X Qᵀ − X̃ Wᵀ‖²."""
    return float(((X @ Q.T - dense @ W.T) ** 2).sum())


def test_gptaq_target_is_the_least_squares_weight_on_the_dense_outputs() -> None:
    X, dense, W, H, D = asymmetric_problem()
    target = gptq.toward_dense(W, H, D, alpha=1.0, damp=0.0)
    exact = torch.linalg.lstsq(X.double(), (dense @ W.T).double()).solution.T  # argmin_V ‖X Vᵀ − X̃ Wᵀ‖
    assert torch.allclose(target.double(), exact, atol=1e-3)
    assert torch.equal(gptq.toward_dense(W, H, torch.zeros_like(D), 1.0, 0.01), W)  # no input error: plain GPTQ


@pytest.mark.parametrize(("bits", "group", "act_order"), [(4, 64, True), (3, 64, False), (2, 64, True), (3, -1, False)])
def test_gptaq_lowers_the_asymmetric_loss_below_gptq(bits: int, group: int, act_order: bool) -> None:
    """GPTAQ ≤ GPTQ on the loss against the dense model's outputs, same Hessian and grid settings; at α = 0 it is
    GPTQ bit for bit."""
    X, dense, W, H, D = asymmetric_problem(seed=bits)
    spec = LayerSpec(bits=bits, group_size=group)
    plain = gptq.apply(LayerWeight(W, spec), H, gptq.Config(act_order=act_order))
    off = gptq.apply(LayerWeight(W, spec), H, gptq.Config(act_order=act_order), D=D)
    assert torch.equal(off.codes, plain.codes)
    losses = {alpha: asymmetric_loss(gptq.apply(LayerWeight(W, spec), H, gptq.Config(act_order=act_order,
                                                asymmetric=alpha), D=D).dequantize(), W, X, dense)
              for alpha in (0.25, 1.0)}
    base = asymmetric_loss(plain.dequantize(), W, X, dense)
    assert losses[1.0] < losses[0.25] < base
