"""EvoPress (Sieberling, Kuznedelev, Kurtic, Alistarh, ICML 2025; IST-DASLab/EvoPress): evolutionary search
over per-layer widths, scored end to end.

1. Teacher: the dense model's next-token log-probs on the calibration pool (top-K of them plus the mass of
   the rest when `topk` > 0, so the cache stays small), computed once.
2. Level database: one sequential pass; every Linear is rounded at every width in `choices` from the same
   Hessian (GPTQ by default) and stored packed on disk; the next block's inputs come from the
   `calibration_bits` version, as in the paper.
3. Search, elitist (1 + λ): each generation makes `offspring` distinct mutants of the parent; a mutation
   moves one bit from one unit to another unit *of the same size* (1-3 such switches, fewer more likely),
   so the budget is exact at every step. Candidates go through the `stages` [(survivors, tokens), ...]:
   each stage scores them on freshly drawn calibration windows and keeps the best; the parent rejoins
   before the last stage, so its fitness is always re-measured on new data. Fitness = token-averaged
   KL(dense ‖ candidate).
4. The state is saved after every generation; re-running the same command continues from it.

Under `torchrun` / `accelerate launch` (compress.parallel) rank 0 builds the teacher and the database while
the others wait, then every process scores each candidate on its share of the stage's windows and the
KL sums are all-reduced, so every rank sees the same fitness and makes the same (seeded) choices: the
search is the one-process search, its fitness evaluations split over the processes. The database and the
work directory must be on a file system all processes see.

The teacher and the database depend only on the model, calibration windows, grid, rounding and `choices`,
not on the target: `database: DIR` keeps them in DIR with a manifest of those inputs, so searches at other
targets (or started from BAQ) reuse them, and a mismatching run is refused rather than silently mixed.

A unit is one Linear, or with `tie` a set the servers fuse (q/k/v, gate/up), which then share a width.
The final model is assembled from the database: nothing is rounded twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from compress import format as fmt
from compress import parallel
from compress.allocate import budget
from compress.allocate.budget import Unit, make_units
from compress.allocate.context import Allocation, Context
from compress.errors import CompressError
from compress.nn import CompressedLinear
from compress.plan import LayerSpec, LayerWeight, Plan
from compress.recipe import require
from compress.reports import LayerReport
from compress.teacher import Teacher, cached
from compress.util import atomic_write


@dataclass(frozen=True)
class Config:
    target_bits: float = 3.0  # average code bits over the searched Linears, by element count
    choices: tuple[int, ...] = (2, 3, 4, 5, 6)  # consecutive widths in the database
    calibration_bits: int = 0  # width of the prefix while building the database; 0 = target rounded
    generations: int = 150
    offspring: int = 128
    stages: tuple[tuple[int, int], ...] = ((16, 2048), (4, 16384), (1, 131072))  # (survivors, tokens)
    topk: int = 256  # KL over the dense top-K tokens + one bucket for the rest; 0 = full vocabulary
    tie: bool = False  # q/k/v and gate/up share a width (what vLLM-style servers fuse)
    init: str = "uniform"  # uniform | baq (BAQ's per-layer closed form from the database's losses)
    theta: float = 1.95  # BAQ's loss slope, for init=baq
    batch_size: int = 4  # windows per forward pass while scoring
    seed: int = 0
    # Directory for the teacher and the level database, shared by runs that agree on model, calibration,
    # grid, rounding and choices (e.g. the same model searched at several targets); None = the run's workdir.
    database: str | None = None
    needs_calibration: ClassVar[bool] = True  # a fact of the allocator, not a recipe knob
    rounds: ClassVar[bool] = True  # its level database already holds every Linear's codes (no sequential pass)

    def __post_init__(self) -> None:
        c = sorted(self.choices)
        if not c or c != list(range(c[0], c[-1] + 1)) or not 1 <= c[0] <= c[-1] <= 8:
            raise CompressError(f"evopress choices={list(self.choices)} must be consecutive widths within 1..8 "
                                "(a mutation moves exactly one bit)")
        if not c[0] <= self.target_bits <= c[-1]:
            raise CompressError(f"evopress target_bits={self.target_bits} is outside choices={c}")
        if not self.stages or self.stages[-1][0] != 1 or any(s < 1 or t < 1 for s, t in self.stages):
            raise CompressError(f"evopress stages={[list(s) for s in self.stages]} must be [survivors, tokens] "
                                "pairs ending with one survivor")
        pairs = list(itertools.pairwise(self.stages))
        if any(b[0] > a[0] or b[1] < a[1] for a, b in pairs):
            raise CompressError(f"evopress stages={[list(s) for s in self.stages]}: each stage keeps no more "
                                "survivors and scores no fewer tokens than the one before")
        if self.init not in ("uniform", "baq"):
            raise CompressError(f"evopress init={self.init!r} is invalid; choose uniform or baq")
        require("allocate", self, positive=("offspring", "batch_size", "theta"),
                non_negative=("generations", "topk", "seed"))
        if self.calibration_bits and self.calibration_bits not in c:
            raise CompressError(f"recipe value allocate.calibration_bits={self.calibration_bits} is not one of "
                                f"choices={c}; use one of them or 0 (the target rounded)")

    @property
    def calib_bits(self) -> int:
        return self.calibration_bits or min(max(math.floor(self.target_bits + 0.5), min(self.choices)),
                                            max(self.choices))


# --- units and mutations (pure) --------------------------------------------------------------------

def size_groups(units: Sequence[Unit]) -> list[list[int]]:
    """Indices of units with equal numel: a bit may only move inside one of these."""
    by: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        by.setdefault(u.numel, []).append(i)
    return list(by.values())


def mutate(widths: Sequence[int], groups: Sequence[Sequence[int]], lo: int, hi: int,
           rng: random.Random) -> list[int]:
    """1-3 level switches (P = 5/9, 3/9, 1/9): +1 bit on one unit, -1 on another of the same size."""
    child = list(widths)
    switches = min(rng.randint(1, 3), rng.randint(1, 3))
    weights = [len(g) if len(g) > 1 else 0 for g in groups]
    for _ in range(switches):
        for _attempt in range(100):
            g = rng.choices(groups, weights=weights)[0]
            up = [i for i in g if child[i] < hi]
            down = [i for i in g if child[i] > lo]
            if up and down:
                i, j = rng.choice(up), rng.choice(down)
                if i != j:
                    child[i] += 1
                    child[j] -= 1
                    break
    return child


def spread(groups: Sequence[Sequence[int]], numel: Sequence[int], target: float, n: int,
           rng: random.Random) -> list[int]:
    """A random assignment with floor/ceil widths in every size group whose average is the target
    (exact whenever a group's size allows it, otherwise just under)."""
    widths = [0] * n
    lo = math.floor(target)
    for g in groups:
        k = math.floor((target - lo) * len(g) + 1e-9)  # units that get the extra bit
        up = set(rng.sample(list(g), k))
        for i in g:
            widths[i] = lo + (i in up)
    return widths


# --- the level database ------------------------------------------------------------------------------

class Database:
    """Every Linear at every width, packed, one safetensors file per Linear: keys '<w>.qweight', '<w>.scale',
    '<w>.zero' (asymmetric), '<w>.loss' (per-column loss). Files are written whole (temp + rename)."""

    def __init__(self, root: Path, specs: dict[str, LayerSpec], choices: Sequence[int]) -> None:
        self.root, self.specs, self.choices = root, specs, list(choices)
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def write(self, name: str, levels: dict[int, LayerWeight]) -> None:
        tensors = {}
        for w, lw in levels.items():
            packed = CompressedLinear.from_weight(lw)
            for k, v in packed.state_dict().items():
                tensors[f"{w}.{k}"] = v.contiguous().cpu()
            tensors[f"{w}.loss"] = lw.loss.cpu()
        atomic_write(self.path(name), lambda tmp: save_file(tensors, tmp))

    def read(self, name: str, width: int, shape: tuple[int, int]) -> LayerWeight:
        with safe_open(self.path(name), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys() if k.startswith(f"{width}.")}  # noqa: SIM118
        if not t:
            raise CompressError(f"the level database has no {width}-bit version of {name}")
        spec = replace(self.specs[name], bits=width)
        N, K = shape
        codes = fmt.unpack_layer(t[f"{width}.qweight"], spec, K)
        scale = t[f"{width}.scale"].float()
        if spec.symmetric:
            zero = torch.tensor(spec.group_bits(K), dtype=torch.float32).sub(1).exp2().expand(N, -1)
        else:
            zero = t[f"{width}.zero"].float()
        lw = LayerWeight(torch.empty(N, K), spec, codes, scale, zero, t[f"{width}.loss"])
        lw.W = lw.dequantize()
        return lw

    def loss(self, name: str, width: int) -> float:
        with safe_open(self.path(name), "pt") as f:
            return float(f.get_tensor(f"{width}.loss").sum())


def build_database(ctx: Context, cfg: Config, db: Database, shapes: dict[str, tuple[int, int]]) -> None:
    """One sequential pass: every Linear rounded at every width from the same Hessian; the model stays dense."""
    names_done = {n for n in ctx.base if db.has(n)}

    def round_all(name: str, lin: nn.Linear, H: Tensor | None, spec: LayerSpec) -> tuple[CompressedLinear, LayerReport]:
        pinned = name in ctx.pinned  # an override fixed its width: only that one is needed
        if name not in names_done:
            widths = [ctx.base[name].bits] if pinned else db.choices
            levels = {w: ctx.round(LayerWeight(lin.weight.detach().float(), replace(spec, bits=w)), H) for w in widths}
            db.write(name, levels)
        lw = db.read(name, ctx.base[name].bits if pinned else cfg.calib_bits, shapes[name])
        bias = None if lin.bias is None else lin.bias.detach()
        rep = LayerReport(name, float(lw.loss.sum()), 0.0, {}, lw.loss, lin.weight.numel())
        return CompressedLinear.from_weight(lw, bias).to(lin.weight.device), rep

    plan = Plan({n: replace(s, bits=cfg.calib_bits) for n, s in ctx.base.layers.items()})
    ctx.measure(plan, round_layer=round_all, stage=f"level database ({', '.join(map(str, db.choices))} bits)")


# --- the search ----------------------------------------------------------------------------------------

class Search:
    """Holds the model with swappable dense weights, the teacher, and the evolving parent."""

    def __init__(self, ctx: Context, cfg: Config, db: Database, units: list[Unit], teach: Teacher,
                 shapes: dict[str, tuple[int, int]]) -> None:
        self.ctx, self.cfg, self.db, self.units, self.teach, self.shapes = ctx, cfg, db, units, teach, shapes
        self.loaded: dict[str, int] = {}  # width currently in each Linear of the model
        self.cache: dict[tuple[str, int], Tensor] = {}

    def load(self, widths: Sequence[int]) -> None:
        for unit, w in zip(self.units, widths, strict=True):
            for name in unit.layers:
                if self.loaded.get(name) != w:
                    lin = self.ctx.model.get_submodule(name)
                    lin.weight.data.copy_(self.db.read(name, w, self.shapes[name]).W)
                    self.loaded[name] = w

    @torch.no_grad()
    def fitness(self, widths: Sequence[int], windows: list[int]) -> float:
        """Token-mean KL(dense ‖ candidate) over `windows`, this process's share of them summed over all."""
        self.load(widths)
        sums = torch.zeros(2, dtype=torch.float64)  # KL, tokens
        pool, bs, mine = self.ctx.windows, self.cfg.batch_size, parallel.shard(windows)
        for i in range(0, len(mine), bs):
            w = torch.tensor(mine[i : i + bs])
            logits = self.ctx.model(input_ids=pool[w].to(self.ctx.device), use_cache=False).logits
            for b in range(len(w)):  # one window at a time keeps the fp32 log-softmax small
                kl = self.teach.kl(logits[b : b + 1].cpu(), w[b : b + 1])
                sums += torch.tensor([float(kl.double().sum()), kl.numel()], dtype=torch.float64)
        parallel.all_sum(sums)
        return float(sums[0] / sums[1])

    def stage_windows(self, stages: Sequence[tuple[int, int]], rng: random.Random) -> list[list[int]]:
        """Fresh windows for each stage of one generation, disjoint across its stages while the pool allows."""
        pool = len(self.ctx.windows)
        n = [min(pool, max(1, round(tokens / self.ctx.windows.shape[1]))) for _, tokens in stages]
        if sum(n) <= pool:
            draw = rng.sample(range(pool), sum(n))
            return [draw[sum(n[:k]) : sum(n[: k + 1])] for k in range(len(n))]
        return [rng.sample(range(pool), k) for k in n]


def _state_path(root: Path) -> Path:
    return root / "search.json"


def _save_state(root: Path, state: dict) -> None:
    text = json.dumps(state)
    atomic_write(_state_path(root), lambda tmp: tmp.write_text(text))


def _rng_state(rng: random.Random) -> list:
    v, inner, gauss = rng.getstate()
    return [v, list(inner), gauss]


def _set_rng(rng: random.Random, s: list) -> None:
    rng.setstate((s[0], tuple(s[1]), s[2]))


def search(ctx: Context, cfg: Config, s: Search, groups: list[list[int]], init: list[int], root: Path) -> dict:
    """Run (or continue) the evolutionary search; returns the final state (parent widths, history)."""
    rng = random.Random(cfg.seed)
    path = _state_path(root)
    if path.is_file():
        state = json.loads(path.read_text())
        _set_rng(rng, state["rng"])
        ctx.log(f"EvoPress: resuming at generation {state['generation']}/{cfg.generations}")
    else:
        state = {"generation": 0, "parent": init, "history": [], "rng": _rng_state(rng)}
    lo, hi = min(cfg.choices), max(cfg.choices)
    parent = state["parent"]
    while state["generation"] < cfg.generations:
        t0 = time.perf_counter()
        seen = {tuple(parent)}
        offspring = []
        for _ in range(cfg.offspring * 50):
            if len(offspring) == cfg.offspring:
                break
            child = mutate(parent, groups, lo, hi, rng)
            if tuple(child) not in seen:
                seen.add(tuple(child))
                offspring.append(child)
        candidates, scores = offspring, []
        for k, ((survivors, _), windows) in enumerate(zip(cfg.stages, s.stage_windows(cfg.stages, rng), strict=True)):
            if k == len(cfg.stages) - 1:
                candidates = [*candidates, parent]  # elitism, re-scored on fresh windows
            scores = [s.fitness(c, windows) for c in candidates]
            order = sorted(range(len(candidates)), key=lambda i: scores[i])[:survivors]
            candidates, scores = [candidates[i] for i in order], [scores[i] for i in order]
        parent = candidates[0]
        state["generation"] += 1
        state["parent"] = parent
        state["history"].append({"fitness": scores[0], "seconds": time.perf_counter() - t0})
        state["rng"] = _rng_state(rng)
        if parallel.is_main():
            _save_state(root, state)
            ctx.log(f"EvoPress generation {state['generation']}/{cfg.generations}: parent KL {scores[0]:.4f} "
                f"({time.perf_counter() - t0:.0f}s)")
    return state


def manifest(ctx: Context, cfg: Config) -> dict:
    """Everything the teacher and the level database depend on (and nothing they don't, like the target)."""
    first = ctx.model.get_submodule(next(iter(ctx.base))).weight
    digest = hashlib.sha256(first.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    rnd = ctx.recipe.round
    return {
        "model": str(getattr(getattr(ctx.model, "config", None), "_name_or_path", "")),
        "weights_sha256": digest,  # of the first compressed Linear, so a different checkpoint is caught
        "calibration": {k: v for k, v in dataclasses.asdict(ctx.recipe.calibrate).items() if k != "batch_size"},
        "round": {"method": rnd.method, **dataclasses.asdict(rnd.config)},
        "layers": {n: {**s.to_dict(), "bits": s.bits if n in ctx.pinned else None} for n, s in ctx.base.layers.items()},
        "choices": sorted(cfg.choices), "calibration_bits": cfg.calib_bits, "topk": cfg.topk,
    }


def check_manifest(root: Path, want: dict) -> None:
    """Adopt `root` for this run, or refuse it when it was built from other inputs."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "manifest.json"
    want = json.loads(json.dumps(want))  # tuples -> lists, as stored
    if not path.is_file():
        if any(root.iterdir()):
            raise CompressError(f"evopress database {root} is not empty and has no manifest.json; "
                                "point allocate.database at a new directory")
        path.write_text(json.dumps(want, indent=1))
        return
    have = json.loads(path.read_text())
    diff = next((k for k in want if have.get(k) != want[k]), None)
    if diff is not None:
        raise CompressError(f"evopress database {root} was built with a different {diff}; "
                            "point allocate.database at another directory or delete it")


def shared_inputs(ctx: Context, cfg: Config, shared: Path, shapes: dict[str, tuple[int, int]]
                  ) -> tuple[Teacher, Database]:
    """The teacher and the level database in `shared`, built when missing (by rank 0 only: main_first)."""
    check_manifest(shared, manifest(ctx, cfg))
    pool_tokens = ctx.windows.numel()
    for _, tokens in cfg.stages:
        if tokens > pool_tokens:
            raise CompressError(f"an evopress stage scores {tokens} tokens but the calibration pool holds "
                                f"{pool_tokens}; raise calibrate.samples or lower the stage tokens")
    if not (shared / "teacher.safetensors").is_file():
        ctx.log(f"EvoPress: dense teacher log-probs on {pool_tokens} calibration tokens")
    teach = cached(shared / "teacher.safetensors", ctx.model.to(ctx.device), ctx.windows, cfg.topk, cfg.batch_size,
                   ctx.device)
    db = Database(shared / "levels", dict(ctx.base.layers), cfg.choices)
    if not all(db.has(n) for n in ctx.base):
        build_database(ctx, cfg, db, shapes)
    return teach, db


def allocate(ctx: Context, cfg: Config) -> Allocation:
    if ctx.windows is None:
        raise CompressError("evopress needs calibration windows")
    shapes = {n: tuple(ctx.model.get_submodule(n).weight.shape) for n in ctx.base}
    ctx.device = parallel.init(ctx.device)
    if ctx.workdir is None and cfg.database is None and parallel.world() > 1:
        raise CompressError("evopress under several processes needs a directory they all see: give the run an "
                            "output directory or set allocate.database")
    root = ctx.workdir / "evopress" if ctx.workdir is not None else Path(tempfile.mkdtemp(prefix="evopress-"))
    root.mkdir(parents=True, exist_ok=True)
    shared = root if cfg.database is None else Path(cfg.database).expanduser()
    with parallel.main_first():
        teach, db = shared_inputs(ctx, cfg, shared, shapes)
    units = make_units(ctx.base, {n: N * K for n, (N, K) in shapes.items()}, ctx.arch.blocks, cfg.tie, ctx.pinned)
    groups = size_groups(units)
    numel = [u.numel for u in units]
    rng = random.Random(cfg.seed + 1)
    if cfg.init == "baq":
        ctx.log(f"EvoPress init=baq {budget.CROSS_LINEAR_CAVEAT} Prefer init=uniform.")
        L = torch.tensor([sum(db.loss(n, cfg.calib_bits) for n in u.layers) for u in units], dtype=torch.float64)
        init = budget.discrete(L, torch.tensor(numel, dtype=torch.float64), cfg.target_bits, cfg.theta,
                               cfg.calib_bits, cfg.choices).tolist()
    else:
        init = spread(groups, numel, cfg.target_bits, len(units), rng)
    ctx.model.to(ctx.device)
    s = Search(ctx, cfg, db, units, teach, shapes)
    state = search(ctx, cfg, s, groups, init, root)
    widths = state["parent"]
    layers = dict(ctx.base.layers)
    for unit, w in zip(units, widths, strict=True):
        for name in unit.layers:
            layers[name] = replace(layers[name], bits=int(w))
    avg = sum(w * n for w, n in zip(widths, numel, strict=True)) / sum(numel)
    summary = {"method": "evopress", "target_bits": cfg.target_bits, "searched_bits": avg,
               "generations": state["generation"], "init": cfg.init,
               "fitness_history": [h["fitness"] for h in state["history"]],
               "search_seconds": sum(h["seconds"] for h in state["history"])}

    def weights(name: str) -> LayerWeight:
        return db.read(name, layers[name].bits, shapes[name])

    return Allocation(Plan(layers), weights=weights, summary=summary)
