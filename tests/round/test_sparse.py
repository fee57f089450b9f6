"""Prune-then-quantize: every row keeps its count, pruned weights decode to exactly 0, GPTQ compensates
(lower loss than pruning after rounding), only kept codes are stored, and checkpoints load to equal logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import hessian, logits, run, tiny_llama, weight

import compress
from compress import checkpoint
from compress.errors import CompressError
from compress.nn import CompressedLinear
from compress.plan import LayerSpec, LayerWeight
from compress.round import gptq, rtn
from compress.round.loss import layer_loss


@pytest.mark.parametrize("prune", ["magnitude", "wanda", "obs"])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", 0.0)])
def test_pruned_gptq_keeps_counts_zeros_and_beats_pruning_alone(prune: str, pattern: str, sparsity: float) -> None:
    W, H = weight(N=32, K=128), hessian(128)
    spec = LayerSpec(bits=4, group_size=32, sparsity=sparsity, pattern=pattern, prune=prune)
    lw = gptq.apply(LayerWeight(W, spec), H, gptq.Config())
    assert lw.keep is not None and bool((lw.keep.sum(1) == 64).all())
    Wq = lw.dequantize()
    assert bool((Wq[~lw.keep] == 0).all())
    if pattern == "2:4":
        assert bool((lw.keep.view(32, 32, 4).sum(-1) == 2).all())
    # compensation: GPTQ with the mask beats masking then rounding each weight to nearest
    near = rtn.apply(LayerWeight(W * lw.keep, LayerSpec(bits=4, group_size=32)), None, rtn.Config())
    assert layer_loss(W, Wq, H) < layer_loss(W, near.dequantize() * lw.keep, H)
    m = CompressedLinear.from_weight(lw, None)
    assert torch.equal(m.dequantize(), Wq)
    code, _ = spec.bits_per_weight(32, 128)
    assert code == pytest.approx(4 * 0.5 + 1)  # kept codes + the mask
    assert m.qweight.shape == (32, 2 * 4)  # 64 kept codes of 4 bits = 8 words


def test_bad_sparsity_settings_are_clear_errors() -> None:
    with pytest.raises(CompressError, match="contradicts pattern"):
        LayerSpec(bits=4, sparsity=0.3, pattern="2:4")
    with pytest.raises(CompressError, match="uniform group-wise"):
        LayerSpec(bits=1, binary=True, sparsity=0.5)


def test_pruned_checkpoint_loads_with_identical_logits_and_is_smaller(tmp_path: Path) -> None:
    m = tiny_llama()
    res = run(m, "gptq-4bit", ("weights.sparsity=0.5", "weights.prune=wanda"))
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path / "sparse", card="card")
    assert torch.equal(logits(compress.load(tmp_path / "sparse")), logits(m))
    dense = tiny_llama()
    full = run(dense, "gptq-4bit")
    checkpoint.save(dense, None, full.plan, full.recipe, tmp_path / "dense", card="card")
    q = {n: mod for n, mod in m.named_modules() if isinstance(mod, CompressedLinear)}
    assert all(float((mod.dequantize() == 0).float().mean()) >= 0.5 for mod in q.values())
    assert 3.0 <= res.avg_bits()[0] < 3.2  # 2 bits of kept codes + 1 of mask (+ padding to 32-code words)
    assert checkpoint.disk_bytes(tmp_path / "sparse") < checkpoint.disk_bytes(tmp_path / "dense")
