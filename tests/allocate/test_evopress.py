"""EvoPress: exact budgets under mutation, resumable search, tied layers, loadable mixed checkpoints."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import EVO, SMALL, tiny_llama, torchrun

from compress import data, models, pipeline, recipe
from compress.allocate import evopress
from compress.allocate.context import Context
from compress.errors import CompressError
from compress.pipeline import make_plan


def test_mutation_keeps_the_budget_exact_over_a_thousand_steps() -> None:
    rng = random.Random(0)
    numel = [100] * 10 + [300] * 6 + [50] * 4
    groups = evopress.size_groups([evopress.Unit((str(i),), n) for i, n in enumerate(numel)])
    widths = evopress.spread(groups, numel, 3.0, len(numel), rng)
    total = sum(w * n for w, n in zip(widths, numel, strict=True))
    assert total == 3 * sum(numel)
    for _ in range(1000):
        child = evopress.mutate(widths, groups, 2, 6, rng)
        assert sum(w * n for w, n in zip(child, numel, strict=True)) == total
        assert all(2 <= w <= 6 for w in child)
        widths = child
    assert len(set(widths)) > 1


def test_spread_hits_fractional_targets_per_size_group() -> None:
    numel = [10] * 8 + [40] * 4
    groups = evopress.size_groups([evopress.Unit((str(i),), n) for i, n in enumerate(numel)])
    w = evopress.spread(groups, numel, 2.5, len(numel), random.Random(1))
    assert sum(a * n for a, n in zip(w, numel, strict=True)) == 2.5 * sum(numel)


def context(tmp_path: Path, edits: tuple[str, ...] = ()) -> tuple[Context, evopress.Config]:
    m = tiny_llama()
    rec = recipe.load("gptq-3bit", [*SMALL, "calibrate.samples=16", EVO, *edits])
    arch = models.arch_of(m)
    base = make_plan(m, arch, rec)
    windows = data.calibration(None, "random", 16, 32, vocab_size=m.config.vocab_size).ids
    ctx = replace(pipeline.context(m, arch, base, windows, rec, "cpu", None, None, lambda s: None), workdir=tmp_path)
    return ctx, rec.allocate.config


def test_search_resumes_to_the_same_result(tmp_path: Path) -> None:
    ctx, cfg = context(tmp_path / "straight")
    straight = evopress.allocate(ctx, replace(cfg, generations=4))
    ctx, cfg = context(tmp_path / "resumed")
    first = evopress.allocate(ctx, replace(cfg, generations=2))
    assert first.summary["generations"] == 2
    ctx, cfg = context(tmp_path / "resumed")  # a new process: fresh model, same work directory
    resumed = evopress.allocate(ctx, replace(cfg, generations=4))
    assert resumed.plan.layers == straight.plan.layers
    assert resumed.summary["fitness_history"] == pytest.approx(straight.summary["fitness_history"])


def test_tied_layers_share_a_width_and_budget_is_exact(tmp_path: Path) -> None:
    ctx, cfg = context(tmp_path, ("allocate.tie=true", "allocate.generations=6"))
    alloc = evopress.allocate(ctx, cfg)
    for b in range(2):
        p = f"model.layers.{b}"
        qkv = {alloc.plan[f"{p}.self_attn.{x}_proj"].bits for x in "qkv"}
        gate_up = {alloc.plan[f"{p}.mlp.{x}_proj"].bits for x in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1
    numel = {n: ctx.model.get_submodule(n).weight.numel() for n in alloc.plan}
    avg = sum(alloc.plan[n].bits * numel[n] for n in numel) / sum(numel.values())
    assert avg == pytest.approx(3.0)


def test_assembled_layers_come_from_the_database(tmp_path: Path) -> None:
    ctx, cfg = context(tmp_path)
    alloc = evopress.allocate(ctx, cfg)
    name = "model.layers.1.mlp.down_proj"
    lw = alloc.weights(name)
    assert lw.spec.bits == alloc.plan[name].bits
    assert torch.equal(lw.codes, lw.codes.clamp(max=2 ** lw.spec.bits - 1))


def test_shared_database_serves_other_targets_and_refuses_other_inputs(tmp_path: Path) -> None:
    db = tmp_path / "db"
    ctx, cfg = context(tmp_path / "a", (f"allocate.database={db}",))
    evopress.allocate(ctx, cfg)
    files = {p: p.stat().st_mtime_ns for p in db.rglob("*.safetensors")}
    assert len(files) == 1 + 2 * 7  # the teacher and every Linear of the two blocks

    ctx, cfg = context(tmp_path / "b", (f"allocate.database={db}", "allocate.target_bits=2.5"))
    alloc = evopress.allocate(ctx, cfg)  # another target: nothing is rebuilt
    assert {p: p.stat().st_mtime_ns for p in db.rglob("*.safetensors")} == files
    numel = {n: ctx.model.get_submodule(n).weight.numel() for n in alloc.plan}
    assert sum(alloc.plan[n].bits * numel[n] for n in numel) / sum(numel.values()) == pytest.approx(2.5)

    ctx, cfg = context(tmp_path / "c", (f"allocate.database={db}", "weights.group_size=16"))
    with pytest.raises(CompressError, match="different layers"):
        evopress.allocate(ctx, cfg)


def test_two_gloo_processes_search_like_one(tmp_path: Path) -> None:
    """Under torchrun the fitness windows are split over the processes and the KL sums all-reduced: two
    processes choose the same widths with the same fitness history as one (rank 0 builds the teacher and
    the level database while the other waits, then reads them)."""
    one = torchrun("evopress_worker.py", 1, tmp_path / "one.json", str(tmp_path / "db1"))
    two = torchrun("evopress_worker.py", 2, tmp_path / "two.json", str(tmp_path / "db2"))
    assert two["widths"] == one["widths"] and len(set(one["widths"].values())) > 1
    assert two["fitness"] == pytest.approx(one["fitness"], rel=1e-6)


def test_each_generation_scores_its_stages_on_disjoint_fresh_windows(tmp_path: Path) -> None:
    ctx, cfg = context(tmp_path)
    s = evopress.Search(ctx, cfg, None, [], None, {})  # type: ignore[arg-type]
    rng = random.Random(0)
    stages = ((4, 64), (2, 128), (1, 256))  # 2 + 4 + 8 windows of 32 tokens from a pool of 16
    first, second = s.stage_windows(stages, rng), s.stage_windows(stages, rng)
    assert [len(w) for w in first] == [2, 4, 8]
    assert len({i for w in first for i in w}) == 14  # no window scores two stages of one generation
    assert first != second  # fresh draws every generation
    with pytest.raises(CompressError, match="no fewer tokens"):
        replace(cfg, stages=((2, 128), (1, 64)))
