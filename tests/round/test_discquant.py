"""DiscQuant: the linear term alone lands on the RTN vertex, rounded weights are grid neighbours, checkpoints
load to equal logits, a resumed run equals an uninterrupted one, and the KL ends below RTN's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SMALL, logits, tiny_llama

import compress
from compress import checkpoint, data, grid, recipe
from compress.pipeline import make_plan
from compress.plan import LayerSpec, LayerWeight
from compress.round import discquant, rtn

FAST = ["round.steps=24", "round.windows_per_step=2", "round.warmup=4", "round.lr=0.1", "round.save_every=4",
        "round.log_every=4", "weights.group_size=16"]


def setup(edits: tuple[str, ...] = ()) -> tuple[torch.nn.Module, compress.Recipe, torch.Tensor]:
    m = tiny_llama()
    rec = recipe.load("discquant-3bit", [*SMALL, *FAST, *edits])
    ids = data.calibration(None, "random", 8, 32, vocab_size=m.config.vocab_size).ids
    return m, rec, ids


def run(edits: tuple[str, ...] = (), **kw) -> tuple[torch.nn.Module, dict[str, LayerWeight]]:
    m, rec, ids = setup(edits)
    plan = make_plan(m, compress.models.arch_of(m), rec)
    return m, discquant.round_model(m, plan, ids, rec.round.config, **kw)[0]


def test_linear_term_alone_converges_to_the_rtn_vertex() -> None:
    _, out = run(("round.rho=0", "round.steps=40"))
    for name, lw in out.items():
        near = rtn.apply(LayerWeight(lw.W, lw.spec), None, rtn.Config())
        assert torch.equal(lw.scale, near.scale) and torch.equal(lw.zero, near.zero)
        q = lw.W / grid.expand(lw.scale, lw.spec.group_width(lw.W.shape[1]), lw.W.shape[1])
        tie = (q - q.floor() - 0.5).abs() < 1e-3  # |c| = |2y - 1| ~ 0 in fp16: no force, either way is fine
        assert lw.info["fractional"] <= float(tie.float().mean()), name  # everything else sits at a vertex
        assert torch.equal(lw.codes[~tie], near.codes[~tie]), name


@pytest.mark.parametrize("spec", [LayerSpec(bits=3, group_size=16, symmetric=True),
                                  LayerSpec(bits=(2, 4, 3, 8), group_size=16, symmetric=False),
                                  LayerSpec(bits=3, group_size=-1, symmetric=False, levels=tuple([1, 4, 8, 3] * 16))])
def test_rounding_is_one_of_the_two_grid_neighbours(spec: LayerSpec) -> None:
    W = torch.randn(8, 64)
    rl = discquant.RoundingLinear(LayerWeight(W, spec), None)
    rl.x.data.uniform_(0, 1)
    lw = rl.rounded()
    Wq = lw.dequantize()
    S, _ = rl.element_grid()
    assert bool((lw.codes.float() <= spec.column_bits(64).float().exp2() - 1).all())
    inside = rl.s  # weights strictly between two grid points (the rest sit on one, or beyond the grid's ends)
    assert bool(((Wq - W).abs()[inside] <= S[inside] + 1e-6).all())  # never further than one grid step
    down = rl.d.float()
    assert bool(((lw.codes.float() == down) | (lw.codes.float() == down + rl.s.float())).all())
    rl.x.data.copy_((rl.c.float() + 1) / 2)  # x = y reproduces W (up to the fp16 of c)
    assert torch.allclose(rl.interpolated()[inside], W[inside], atol=float(S.max()) * 1e-3)


def test_direction_clamps_the_kl_gradient_and_keeps_the_linear_term() -> None:
    g = torch.tensor([10.0, -10.0, 0.001, 0.0])
    c = torch.tensor([0.2, 0.2, -0.5, 1.0]).half()
    assert torch.allclose(discquant.direction(g.clone(), c, rho=200, kappa=0.5),
                          torch.tensor([0.3, -0.7, 0.7, -1.0]), atol=1e-3)  # c is stored in fp16


def test_checkpoint_loads_to_the_in_memory_logits(tmp_path: Path) -> None:
    m, rec, _ = setup()
    res = compress.compress(m, None, rec)
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path, card="card")
    assert torch.equal(logits(compress.load(tmp_path)), logits(m))


def test_interrupted_run_resumes_to_the_same_rounding(tmp_path: Path) -> None:
    _, straight = run(workdir=tmp_path / "a")

    def stop(p: discquant.Progress) -> None:
        if p.step == 10:  # the last saved state is step 8
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(workdir=tmp_path / "b", on_step=stop)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["discquant-state.safetensors"]  # no pickle, no temp
    _, resumed = run(workdir=tmp_path / "b")
    for name, lw in straight.items():
        assert torch.equal(resumed[name].codes, lw.codes), name
    assert resumed[next(iter(resumed))].info["kl_last"] == pytest.approx(lw.info["kl_last"])


def test_the_random_start_neither_reads_nor_moves_the_global_rng() -> None:
    m, rec, ids = setup(("round.steps=2",))
    plan = make_plan(m, compress.models.arch_of(m), rec)
    out = {}
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        out[global_seed] = discquant.round_model(m, plan, ids, rec.round.config)[0]
        assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(out[1][n].codes, out[2][n].codes) for n in out[1])


@torch.no_grad()
def _kl(dense: torch.Tensor, other: torch.Tensor) -> float:
    p, q = dense.log_softmax(-1), other.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_kl_ends_below_rtn_on_the_same_grid() -> None:
    dense = logits(tiny_llama())
    m, rec, _ = setup(("round.steps=60", "calibrate.samples=16"))
    compress.compress(m, None, rec)
    r = tiny_llama()
    compress.compress(r, None, recipe.load("rtn-3bit", [*SMALL, "weights.group_size=16", "weights.symmetric=true"]))
    assert _kl(dense, logits(m)) < _kl(dense, logits(r))


def test_discquant_rounds_a_baq_allocation_and_it_loads(tmp_path: Path) -> None:
    m = tiny_llama()
    rec = recipe.load("baq-discquant-3bit", [*SMALL, *FAST, "allocate.choices=[2, 3, 4]", "allocate.target_bits=2.5",
                                               "weights.group_size=32"])  # parts of whole 32-column words
    res = compress.compress(m, None, rec)
    widths = {b for n, spec in res.plan.layers.items() for b in spec.column_bits(res.shapes[n][1]).tolist()}
    assert len(widths) > 1 and 2.4 < res.avg_bits()[0] <= 2.5 + 1e-12
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path, card="card")
    assert torch.equal(logits(compress.load(tmp_path)), logits(m))
