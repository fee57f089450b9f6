"""Rotations fused into the weights (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024): the same model,
whose weights have no outliers, so that a grid rounds them with less error.

With row vectors (x W^T for a Linear of weight W [N, K]) and an orthogonal R (R R^T = I):

    R1 [d, d] on the residual stream h -> h R1:
        embedding E [V, d]                          -> E R1
        Linears that read the stream (q, k, v, gate, up, lm_head: W [N, d])  -> W R1
        Linears that write it (o, down: W [d, N], bias b [d])                 -> R1^T W,  b R1
    RMSNorm commutes with R1 once its scale g is folded into the Linears that read its output (W -> W diag(g),
    g -> 1): ||h R1|| = ||h||. A tied lm_head then differs from the embedding (E diag(g_final) R1 vs E R1), so it
    is untied: on SmolLM2 that is 49152 x 576 = 28.3M more parameters, kept dense (bf16: +56.6 MB), reported.
    R2 [h, h] per attention head on the values: v_proj rows of kv head j -> R2^T W_vj (bias b_vj R2), o_proj
    columns of head i -> W_oi R2. Attention mixes positions linearly, so head i's output is rotated by R2 too
    and o_proj takes it back (the same R2 for every head, so grouped-query heads need no bookkeeping).

The rotated model gives the original's outputs up to rounding (tests/test_rotate.py: fp64 weights, logits within
1e-6, the float32 in which transformers' RMSNorm normalises) and is an
ordinary model: every export and runtime serves it as it is. R is a Hadamard matrix with random signs
(`hadamard`: Sylvester's for powers of two, Paley's for q + 1 with q a prime = 3 mod 4, and their Kronecker
products: 576 = 12 x 12 x 4, 64 = 2^6), or a random orthogonal matrix (`random`: QR of a Gaussian), both seeded.

Architectures: Llama-like decoders (pre-norm RMSNorm blocks with q/k/v/o and gate/up/down: llama, mistral,
qwen2, qwen3, granite, olmo2 is post-norm and is refused); anything else is refused in one line before any work.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from compress.errors import CompressError
from compress.recipe import Rotate

log = logging.getLogger(__name__)

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "granite")  # pre-norm RMSNorm blocks, SwiGLU MLP


# --- orthogonal matrices ------------------------------------------------------------------------------------

def _paley(q: int) -> Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=torch.float64)
    Q = torch.stack([chi[(torch.arange(q) - i) % q] for i in range(q)])  # Jacobsthal matrix, Q[i, j] = chi(j - i)
    H = torch.ones(q + 1, q + 1, dtype=torch.float64)
    H[1:, 0] = -1
    H[1:, 1:] = Q + torch.eye(q, dtype=torch.float64)
    return H


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _hadamard_unnormalised(n: int) -> Tensor | None:
    """A ±1 Hadamard matrix of order n built from Sylvester and Paley blocks, or None when this construction has
    none (orders that are not a product of 2 and q + 1 blocks)."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 2 == 0 and (half := _hadamard_unnormalised(n // 2)) is not None:
        return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), half)
    for m in range(4, n + 1, 4):  # a Paley block of order m = q + 1 times whatever is left
        if n % m == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            rest = _hadamard_unnormalised(n // m)
            if rest is not None:
                return torch.kron(_paley(m - 1), rest)
    return None


def orthogonal(n: int, method: str, seed: int) -> Tensor:
    """An n x n orthogonal matrix in float64: a Hadamard matrix / sqrt(n) with random column signs, or a random one."""
    g = torch.Generator().manual_seed(seed)
    if method == "random":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))  # Haar-distributed
    H = _hadamard_unnormalised(n)
    if H is None:
        raise CompressError(f"no Hadamard matrix of order {n} is built here (products of powers of two and q + 1 "
                            "blocks, q a prime = 3 mod 4); use rotate.method=random")
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return H * signs / math.sqrt(n)


# --- fusing into a model ------------------------------------------------------------------------------------

def check(config: Any, cfg: Rotate) -> None:
    """Refuse, before any work, a model these rotations do not cover."""
    if cfg.method == "none":
        return
    if config.model_type not in ARCHS:
        raise CompressError(f"rotate: model type {config.model_type!r} is not rotated here yet (we rotate "
                            f"{', '.join(ARCHS)}: pre-norm RMSNorm decoders); use rotate.method=none")


@torch.no_grad()
def apply(model: nn.Module, cfg: Rotate) -> dict[str, Any]:
    """Rotate `model` in place (float64 arithmetic, stored back in each weight's dtype); returns what it changed."""
    if cfg.method == "none":
        return {}
    check(model.config, cfg)
    core = model.model
    blocks = list(core.layers)
    d = model.config.hidden_size
    heads = model.config.num_attention_heads
    head_dim = getattr(model.config, "head_dim", None) or d // heads
    R1 = orthogonal(d, cfg.method, cfg.seed) if cfg.r1 else None
    R2 = orthogonal(head_dim, cfg.method, cfg.seed + 1) if cfg.r2 else None
    facts: dict[str, Any] = {"method": cfg.method, "seed": cfg.seed, "r1": cfg.r1, "r2": cfg.r2}

    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if cfg.r1 and head.weight is emb.weight:  # the head is about to differ from the embedding
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        facts["untied_lm_head_params"] = head.weight.numel()
        log.info("rotate: lm_head untied from the embedding (+%d dense parameters)", head.weight.numel())

    def fold(norm: nn.Module, readers: list[nn.Linear]) -> None:  # W -> W diag(g), g -> 1
        g = norm.weight.detach().double()
        for lin in readers:
            _set(lin.weight, lin.weight.double() * g)
        norm.weight.fill_(1.0)

    if R1 is not None:  # (only R1 needs the norms folded: R2 acts inside attention)
        for b in blocks:
            attn, mlp = b.self_attn, b.mlp
            fold(b.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
            fold(b.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        fold(core.norm, [head])
        _set(emb.weight, emb.weight.double() @ R1)
        for b in blocks:
            for lin in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj, b.mlp.gate_proj, b.mlp.up_proj):
                _set(lin.weight, lin.weight.double() @ R1)
            for lin in (b.self_attn.o_proj, b.mlp.down_proj):
                _set(lin.weight, R1.T @ lin.weight.double())
                if lin.bias is not None:
                    _set(lin.bias, lin.bias.double() @ R1)
        _set(head.weight, head.weight.double() @ R1)
    if R2 is not None:
        for b in blocks:
            v, o = b.self_attn.v_proj, b.self_attn.o_proj
            Wv = v.weight.double().reshape(-1, head_dim, v.weight.shape[1])  # [kv heads, h, d]
            _set(v.weight, (R2.T @ Wv).reshape(v.weight.shape))
            if v.bias is not None:
                _set(v.bias, (v.bias.double().reshape(-1, head_dim) @ R2).reshape(-1))
            Wo = o.weight.double().reshape(o.weight.shape[0], -1, head_dim)  # [d, heads, h]
            _set(o.weight, (Wo @ R2).reshape(o.weight.shape))
    return facts


def _set(p: Tensor, value: Tensor) -> None:
    p.copy_(value.to(p.dtype))
