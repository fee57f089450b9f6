"""compress(): the stages as visible data flow over one `Plan`.

    recipe ──> plan (allocate: uniform today) ──> calibration windows ──> sequential rounding ──> model
                                                                          (GPTQ / RTN per Linear)

The model is modified in place: every planned Linear becomes a packed `CompressedLinear`.
"""

from __future__ import annotations

import copy
import logging
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress import data, distill, models, parallel, sequential, teacher
from compress.allocate import METHODS as ALLOCATORS
from compress.allocate.context import Allocation, Context
from compress.checkpoint import WorkDir
from compress.errors import CompressError
from compress.plan import Plan
from compress.recipe import Recipe
from compress.round import METHODS, joint
from compress.sequential import BlockReport, Progress

log = logging.getLogger(__name__)


@dataclass
class Result:
    model: nn.Module
    plan: Plan
    recipe: Recipe
    blocks: list[BlockReport] = field(default_factory=list)
    calibration: str = "none (data-free)"
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    allocation: dict[str, Any] = field(default_factory=dict)  # what the allocator reports (predicted gain, ...)
    rounding: dict[str, Any] = field(default_factory=dict)  # what a joint rounding reports (steps, KL history)
    distilled: dict[str, Any] = field(default_factory=dict)  # what the distillation stage did (steps, KL)
    # the uniform model an allocator's prediction is relative to (BAQ's pass 1), to score it end to end
    reference: dict[str, nn.Module] | None = field(default=None, repr=False)

    def avg_bits(self) -> tuple[float, float]:
        return self.plan.avg_bits(self.shapes)

    @property
    def total_loss(self) -> float:
        """Sum of the method's layer losses over the blocks compressed in this run (resumed ones excluded)."""
        return sum(b.loss for b in self.blocks if not b.resumed)

    @property
    def resumed(self) -> int:
        return sum(b.resumed for b in self.blocks)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB. Linux's VmHWM, which starts afresh at exec
    (getrusage's ru_maxrss survives exec, so a benchmark child would report its parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, the fallback elsewhere


def make_plan(model: nn.Module, arch: models.Arch, recipe: Recipe) -> Plan:
    """Uniform allocation: every Linear inside the blocks gets the recipe's spec, after overrides.
    Embeddings, lm_head and norms are outside the blocks (or not Linear) and stay dense."""
    layers = {}
    for name, m in models.blocks_of(model, arch).named_modules():
        if isinstance(m, nn.Linear):
            fqn = f"{arch.blocks}.{name}"
            spec = recipe.layer_spec(fqn)
            if spec is not None:
                layers[fqn] = spec
    if not layers:
        raise CompressError("the recipe leaves no Linear to compress (every layer is skipped)")
    return Plan(layers)


def compress(model: nn.Module, tokenizer: Any, recipe: Recipe, *, device: str | torch.device = "cpu",
             progress: Progress | None = None, workdir: WorkDir | None = None,
             say: Callable[[str], None] | None = None) -> Result:
    """Compress `model` in place following `recipe`; a `workdir` makes the run resumable; `say` receives
    one-line progress messages of the allocation stage (default: the library's logger)."""
    t0 = time.perf_counter()
    arch = models.arch_of(model)
    base = make_plan(model, arch, recipe)
    check_pruned_training(base, recipe.distill)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in base}
    rnd, alloc, c = recipe.round, recipe.allocate, recipe.calibrate
    windows = None
    kd = recipe.distill
    if (rnd.config.needs_hessian or getattr(rnd.config, "needs_calibration", False) or alloc.config.needs_calibration
            or kd.steps):
        windows = data.calibration(tokenizer, c.dataset, c.samples, c.seqlen, c.seed,
                                   vocab_size=model.config.vocab_size)
        log.info("calibration: %s", windows.describe())
    ids = None if windows is None else windows.ids
    ctx = Context(model, arch, base, {n for n in base if recipe.pinned(n)}, ids, recipe, torch.device(device),
                  None if workdir is None else workdir.dir, progress, say or log.info)
    teach, distilled, kd_ids, dense = None, {}, ids, None
    if kd.steps:  # the original's distributions (and text, hidden states), before any weight is rounded
        assert ids is not None
        with parallel.main_first():  # rank 0 writes the shared files, the others then read them
            kd_ids = distill_windows(model.to(device), ids, kd, c.batch_size, torch.device(device), workdir, say)
            (say or log.info)(f"distill: dense teacher log-probs on {kd_ids.numel()} {kd.data} tokens")
            teach = teacher.cached(None if workdir is None else workdir.dir / "distill-teacher.safetensors",
                                   model, kd_ids, kd.topk, c.batch_size, torch.device(device), kd.temperature)
        if kd.hidden_mse:  # the hidden-state term compares with the dense model live: keep a copy
            dense = copy.deepcopy(model).eval()
    if teach is not None and kd.train == "weights":  # ISS-P / pruned training: prune first, then round
        assert kd_ids is not None
        distilled = run_distill(model, teach, kd_ids, kd, workdir, device, say, dense)
        teach = None
    allocation = allocate(ctx, workdir)
    rounding: dict[str, Any] = {}
    if joint(rnd.method):  # rounds the whole model at once (DiscQuant), on the allocation's plan
        assert ids is not None
        weights, rounding = METHODS[rnd.method].round_model(
            model, allocation.plan, ids, rnd.config, device=device, log=say or log.info,
            workdir=None if workdir is None else workdir.dir / rnd.method)
        blocks = sequential.assemble(model, allocation.plan, weights.__getitem__, progress=progress)
    elif allocation.weights is not None:  # the allocator already rounded every Linear (EvoPress's database)
        blocks = sequential.assemble(model, allocation.plan, allocation.weights, progress=progress)
    else:
        blocks = sequential.run(
            model, arch, allocation.plan, METHODS[rnd.method], rnd.config, ids,
            batch_size=c.batch_size, true_sequential=c.true_sequential, device=device,
            resume=None if workdir is None else workdir.load_block,
            on_block_done=None if workdir is None else workdir.save_block,
            progress=progress,
        )
    if teach is not None:
        assert kd_ids is not None
        distilled = run_distill(model, teach, kd_ids, kd, workdir, device, say, dense)
    # The rounding may complete a spec (PB-LLM's salient count and index): the modules hold the final plan.
    plan = Plan({n: model.get_submodule(n).spec for n in allocation.plan})
    return Result(model, plan, recipe, blocks,
                  windows.describe() if windows is not None else "none (data-free)",
                  time.perf_counter() - t0, peak_rss_mb(), shapes, allocation.summary, rounding, distilled,
                  allocation.reference)


@contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """The model with `modules` in place of its own (e.g. the uniform reference of an allocation), restored after."""
    from compress.nn import set_module

    own = {n: model.get_submodule(n) for n in modules}
    for n, m in modules.items():
        set_module(model, n, m)
    try:
        yield model
    finally:
        for n, m in own.items():
            set_module(model, n, m)


def run_distill(model: nn.Module, teach: teacher.Teacher, ids: torch.Tensor, kd: distill.Config,
                workdir: WorkDir | None, device: str | torch.device, say: Callable[[str], None] | None,
                dense: nn.Module | None) -> dict[str, Any]:
    """The distillation stage; returns what it did, for the summary and the model card."""
    t0 = time.perf_counter()
    history = distill.distill(model, teach, ids, kd, workdir=None if workdir is None else workdir.dir,
                              device=device, log=say or log.info, hidden_teacher=dense)
    return {"steps": kd.steps, "train": kd.train, "windows_per_step": kd.windows_per_step, "data": kd.data,
            "temperature": kd.temperature, "hidden_mse": kd.hidden_mse, "sparsity": kd.sparsity,
            "tokens": kd.steps * kd.windows_per_step * (ids.shape[1] - 1),
            # the training loss: the KL itself at temperature 1 without the hidden-state term
            "kl_first": history[0] if history else None, "kl_last": history[-1] if history else None,
            "seconds": time.perf_counter() - t0}


def check_pruned_training(plan: Plan, kd: distill.Config) -> None:
    """train=weights in a recipe prunes before rounding; the rounding must keep exactly its mask."""
    if kd.train != "weights" or not kd.steps:
        return
    if not kd.sparsity:
        raise CompressError("distill train=weights in a recipe is pruned training (ISS-P): set distill.sparsity")
    if kd.pattern == "unstructured" and not kd.per_row:
        raise CompressError("distill train=weights prunes before rounding and the checkpoint keeps the same count "
                            "in every row: set distill.per_row=true")
    for name, spec in plan.layers.items():
        same = spec.pattern == kd.pattern and (kd.pattern != "unstructured" or spec.sparsity == kd.sparsity)
        if not same or spec.prune != "magnitude":
            raise CompressError(f"{name}: the rounding would not keep the pruned training's mask; set "
                                f"weights.sparsity={kd.sparsity}, weights.pattern={kd.pattern} and "
                                "weights.prune=magnitude")


def distill_windows(model: nn.Module, ids: torch.Tensor, kd: distill.Config, batch_size: int, device: torch.device,
                    workdir: WorkDir | None, say: Callable[[str], None] | None) -> torch.Tensor:
    """The distillation windows: the calibration windows, or (data=generated) the dense model's own
    continuations of their first `prompt_tokens` tokens, kept in the work directory for a resumed run."""
    if kd.data == "calibration":
        return ids
    if kd.prompt_tokens >= ids.shape[1]:
        raise CompressError(f"distill prompt_tokens={kd.prompt_tokens} leaves nothing to generate in "
                            f"{ids.shape[1]}-token windows; lower it")
    path = None if workdir is None else workdir.dir / "distill-windows.safetensors"
    if path is not None and path.is_file():
        stored = load_file(path)["ids"]
        if torch.equal(stored[:, : kd.prompt_tokens], ids[:, : kd.prompt_tokens]) and stored.shape == ids.shape:
            return stored
    (say or log.info)(f"distill: the dense model writes {len(ids)} windows of {ids.shape[1]} tokens "
                      f"from {kd.prompt_tokens}-token prompts")
    out = teacher.generate(model, ids[:, : kd.prompt_tokens], ids.shape[1], batch_size, device, seed=kd.seed)
    if path is not None:
        save_file({"ids": out.contiguous()}, path)
    return out


def allocate(ctx: Context, workdir: WorkDir | None) -> Allocation:
    """Run the recipe's allocator; a plan found in the work directory (interrupted run) is reused."""
    method = ctx.recipe.allocate.method
    if method == "uniform":
        return Allocation(ctx.base)
    saved = None if workdir is None else workdir.load_json("allocation")
    if saved is not None and saved.get("method") == method:
        log.info("reusing the allocation of the interrupted run")
        return Allocation(Plan.from_json(saved["plan"]), summary=saved["summary"])
    allocation = ALLOCATORS[method].allocate(ctx, ctx.recipe.allocate.config)
    if workdir is not None and allocation.weights is None:  # (an allocator that rounds resumes on its own)
        workdir.save_json("allocation", {"method": method, "plan": allocation.plan.to_json(),
                                         "summary": allocation.summary})
    return allocation
