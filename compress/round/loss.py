"""The layer-wise reconstruction loss that GPTQ minimises, for comparing methods on one Hessian."""

from __future__ import annotations

from torch import Tensor


def column_loss(W: Tensor, W_hat: Tensor, H: Tensor) -> Tensor:
    """Per-column share of ½·tr(D H Dᵀ), D = W - W_hat [N, K], H [K, K]: returns [K] summing to it."""
    D = (W - W_hat).float()
    return 0.5 * ((D @ H.float()) * D).sum(dim=0)


def layer_loss(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """½·tr(D H Dᵀ) = ½·Σ_rows dᵀ H d: the increase of ‖W X - Ŵ X‖² scaled like H."""
    return float(column_loss(W, W_hat, H).sum())
