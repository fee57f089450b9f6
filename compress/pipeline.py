"""compress(): the stages as data flowing over one `Plan`.

    recipe ─> plan ─> windows ─> teacher ─> [pruned training] ─> allocate ─> round ─> [distill] ─> final plan
                      (calibrate: (learn_from:  (distill train=     (widths)  one of:
                      when a stage  distillation  weights: ISS-P)              joint       DiscQuant, the whole model
                      needs data)   only)                                      database    EvoPress's rounded levels
                                                                               sequential  block by block (GPTQ, RTN,
                                                                                           PB-LLM)
Each stage is one function below that takes and returns explicit values; `compress()` only wires them.
The model is modified in place: every planned Linear becomes a packed `CompressedLinear`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compress import codecs, data, distill, models, moe, parallel, reconstruct, rotate, sequential, teacher
from compress.allocate import METHODS as ALLOCATORS
from compress.allocate.context import Allocation, Context
from compress.errors import CompressError
from compress.plan import Plan
from compress.recipe import Recipe
from compress.reports import BlockReport, Progress, RoundLayer
from compress.round import METHODS, joint, layerwise
from compress.util import atomic_write, peak_rss_mb
from compress.workdir import WorkDir, tensors_digest

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
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> wall seconds, peak RSS MB at its end
    rotation: dict[str, Any] = field(default_factory=dict)  # what the rotation changed (untied lm_head, ...)

    def avg_bits(self) -> tuple[float, float]:
        return self.plan.avg_bits(self.shapes)

    @property
    def total_loss(self) -> float:
        """Sum of the method's layer losses over the blocks compressed in this run (resumed ones excluded)."""
        return sum(b.loss for b in self.blocks if not b.resumed)

    @property
    def resumed(self) -> int:
        return sum(b.resumed for b in self.blocks)


def make_plan(model: nn.Module, arch: models.Arch, recipe: Recipe) -> Plan:
    """Uniform allocation: every Linear inside the blocks gets the recipe's spec, after overrides.
    Embeddings, lm_head and norms are outside the blocks (or not Linear) and stay dense. An override that
    matches no Linear is a warning: usually a typo, or a name from another architecture, that would
    otherwise leave the intended layers at the default spec without a word."""
    import fnmatch

    rotate.check(model.config, recipe.rotate)  # a model the rotations do not cover: refused before any work
    layers = {}
    names = [f"{arch.blocks}.{name}" for name, m in models.blocks_of(model, arch).named_modules()
             if isinstance(m, nn.Linear)]
    for fqn in names:
        spec = recipe.layer_spec(fqn)
        if spec is not None:
            layers[fqn] = spec
    head = output_head(model, recipe)
    if head is not None and (spec := recipe.layer_spec(head)) is not None:
        layers[head] = spec
        names.append(head)
    unused = [o.match for o in recipe.overrides if not any(fnmatch.fnmatchcase(n, o.match) for n in names)]
    if unused:
        log.warning("overrides that match no Linear of the model (they change nothing): %s; Linears are named "
                    "like %s", ", ".join(repr(m) for m in unused), names[0] if names else "(none)")
    if not layers:
        raise CompressError("the recipe leaves no Linear to compress (every layer is skipped)")
    allocator = ALLOCATORS[recipe.allocate.method]
    if hasattr(allocator, "refine"):  # a data-free allocator (llama.cpp's mixes): its plan is known up front
        return allocator.refine(model, Plan(layers), recipe.allocate.config)
    for fqn, spec in layers.items():  # a ggml type whose blocks do not fit the rows: refused before calibration
        if spec.kind == "ggml":
            codecs.ggml.check_shape(spec, model.get_submodule(fqn).weight.shape[1])
    return Plan(layers)


def output_head(model: nn.Module, recipe: Recipe) -> str | None:
    """The name of the output head when the recipe rounds it (weights.lm_head), after checking that it can: a
    Linear of its own (a tied head would be stored twice: dense as the embedding, packed as the head), rounded by
    the block-by-block pass (not a joint rounding or EvoPress's database, which cover the blocks only)."""
    if not recipe.weights.lm_head:
        return None
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    if not isinstance(head, nn.Linear) or name is None:
        raise CompressError(f"weights.lm_head: {type(model).__name__} has no Linear output head to round; set "
                            "weights.lm_head=false")
    untied_by_rotation = recipe.rotate.method != "none" and recipe.rotate.r1
    if head.weight is model.get_input_embeddings().weight and not untied_by_rotation:
        raise CompressError(f"weights.lm_head: {name} is tied to the input embedding, so a packed head would store "
                            "the vocabulary twice (dense as the embedding, packed as the head); leave "
                            "weights.lm_head=false, or rotate (rotate.method=hadamard unties the head anyway)")
    why = (f"round.method={recipe.round.method} rounds the whole model jointly" if joint(recipe.round.method) else
           f"allocate.method={recipe.allocate.method} rounds from its level database"
           if recipe.allocate.method == "evopress" else None)
    if why is not None:
        raise CompressError(f"weights.lm_head: {why}, over the blocks' Linears only; set weights.lm_head=false "
                            "or use the block-by-block rounding (gptq, rtn) with uniform or baq allocation")
    return name


@dataclass
class Distillation:
    """What the distillation stage learns from, captured before any weight is rounded."""

    teacher: teacher.Teacher  # the dense model's (top-k) log-probs on `windows`
    windows: Tensor  # [n, T] the calibration windows, or the dense model's own continuations of them
    dense: nn.Module | None  # a live dense copy, for the hidden-state term


def compress(model: nn.Module, tokenizer: Any, recipe: Recipe, *, device: str | torch.device = "cpu",
             progress: Progress | None = None, workdir: WorkDir | None = None,
             say: Callable[[str], None] | None = None, source: Any = None) -> Result:
    """Compress `model` in place following `recipe`; a `workdir` makes the run resumable; `say` receives
    one-line progress messages of the allocation and training stages (default: the library's logger). With a
    `source` (compress/lazy.py: the model's blocks on the meta device, read from its shards one at a time) every
    block is written to `workdir` and freed once rounded; `checkpoint.save_streamed` then writes the checkpoint."""
    t0 = time.perf_counter()
    say = say or log.info
    stages: dict[str, dict[str, float]] = {}
    if source is not None:
        check_streamable(recipe)
        if workdir is None:
            raise CompressError("a block-by-block run writes each finished block to its work directory: pass one")
    elif moe.unfuse_experts(model):  # fused MoE experts as one Linear pair per expert, before the layout is read
        models.forget(model)
    rotated: dict[str, Any] = {}
    if recipe.rotate.method != "none":  # the same model, rotated (compress/rotate.py); deterministic, so a resumed
        with stage(stages, "rotate"):  # run rotates again and its finished blocks fit
            rotated = rotate.apply(model, recipe.rotate)
        models.forget(model)
    arch = models.arch_of(model)
    base = make_plan(model, arch, recipe)
    check_pruned_training(base, recipe.distill)
    reconstruct.check(recipe, base)  # (what it cannot train: refused before calibration)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in base}
    with stage(stages, "calibrate"):
        windows = calibrate(model, tokenizer, recipe)
    ids = None if windows is None else windows.ids
    if workdir is not None and ids is not None:  # the work resumes only onto the same token ids
        workdir.bind("calibration", tensors_digest({"ids": ids}))
    kd = learn_from(model, ids, recipe, device, workdir, say)
    distilled: dict[str, Any] = {}
    if kd is not None and recipe.distill.train == "weights":  # pruned training (ISS-P): prune first, then round
        distilled, kd = run_distill(model, kd, recipe.distill, workdir, device, say), None
    with stage(stages, "allocate"):
        # (the head, if planned, keeps the recipe's spec: allocators weigh the blocks' Linears against each other)
        allocation = allocate(context(model, arch, base.without(base.head), ids, recipe, device, workdir, progress,
                                      say), workdir)
        if base.head is not None:
            allocation = replace(allocation, plan=Plan({**allocation.plan.layers, base.head: base[base.head]}))
    with stage(stages, "round"):
        blocks, rounding = round_model(model, arch, allocation, ids, recipe, device, workdir, progress, say, source)
    if kd is not None:
        with stage(stages, "distill"):
            distilled = run_distill(model, kd, recipe.distill, workdir, device, say)
    plan = final_plan(model, allocation.plan)
    return Result(model, plan, recipe, blocks, windows.describe() if windows is not None else "none (data-free)",
                  time.perf_counter() - t0, peak_rss_mb(), shapes, allocation.summary, rounding, distilled,
                  allocation.reference, stages, rotated)


@contextmanager
def stage(stages: dict[str, dict[str, float]], name: str) -> Iterator[None]:
    """Record a stage's wall seconds and the process's peak RSS at its end (what the run's table reports)."""
    t0 = time.perf_counter()
    yield
    stages[name] = {"seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}


def check_streamable(recipe: Recipe) -> None:
    """Refuse, before any work, what a block-by-block run cannot do: stages that need the whole model at once."""
    whole = [what for what, needed in (
        (f"allocate.method={recipe.allocate.method}", recipe.allocate.method not in ("uniform", "mix")),
        (f"rotate.method={recipe.rotate.method}", recipe.rotate.method != "none"),
        (f"round.method={recipe.round.method}", joint(recipe.round.method)),
        ("distill", bool(recipe.distill.steps)),
        ("weights.lm_head", recipe.weights.lm_head)) if needed]
    if whole:
        raise CompressError(f"recipe {recipe.name} needs the whole model in memory ({', '.join(whole)}), but this "
                            "model is read block by block; use a sequential recipe (gptq-*, rtn-*, pbllm-*) or a "
                            "machine with more memory (--stream off)")


def calibrate(model: nn.Module, tokenizer: Any, recipe: Recipe) -> data.Windows | None:
    """The calibration windows, when any stage looks at data (None for RTN alone: data-free)."""
    rnd, c = recipe.round, recipe.calibrate
    if not (rnd.config.needs_hessian or rnd.config.needs_calibration or recipe.allocate.config.needs_calibration
            or recipe.distill.steps):
        return None
    windows = data.calibration(tokenizer, c.dataset, c.samples, c.seqlen, c.seed, vocab_size=model.config.vocab_size)
    log.info("calibration: %s", windows.describe())
    return windows


def learn_from(model: nn.Module, ids: Tensor | None, recipe: Recipe, device: str | torch.device,
               workdir: WorkDir | None, say: Callable[[str], None]) -> Distillation | None:
    """The dense model's distributions (and text, hidden states) for the distillation stage, before any
    weight is rounded; None without one. Rank 0 writes the shared files, the others then read them."""
    kd, c = recipe.distill, recipe.calibrate
    if not kd.steps:
        return None
    assert ids is not None
    dev = torch.device(device)
    with parallel.main_first():
        kd_ids = distill_windows(model.to(device), ids, kd, c.batch_size, dev, workdir, say)
        say(f"distill: dense teacher log-probs on {kd_ids.numel()} {kd.data} tokens")
        teach = teacher.cached(None if workdir is None else workdir.dir / "distill-teacher.safetensors",
                               model, kd_ids, kd.topk, c.batch_size, dev, kd.temperature)
    return Distillation(teach, kd_ids, copy.deepcopy(model).eval() if kd.hidden_mse else None)


def context(model: nn.Module, arch: models.Arch, base: Plan, ids: Tensor | None, recipe: Recipe,
            device: str | torch.device, workdir: WorkDir | None, progress: Progress | None,
            say: Callable[[str], None]) -> Context:
    """What an allocator works with, including `measure`: the sequential pass with the per-layer method (the
    recipe's, or GPTQ when the recipe rounds jointly), the model left dense."""
    method, cfg = layerwise(recipe.round.method, recipe.round.config)
    c = recipe.calibrate

    def measure(plan: Plan, *, stage: str, round_layer: RoundLayer | None = None,
                kept: dict[str, nn.Module] | None = None) -> list[BlockReport]:
        return sequential.run(model, arch, plan, method, cfg, ids, batch_size=c.batch_size,
                              true_sequential=c.true_sequential, device=device, progress=progress,
                              round_layer=round_layer, restore=True, stage=stage, kept=kept)

    return Context(model, arch, base, {n for n in base if recipe.pinned(n)}, ids, recipe, measure,
                   lambda lw, H: method.apply(lw, H, cfg), method.__name__.rsplit(".", 1)[-1], cfg.needs_hessian,
                   torch.device(device), None if workdir is None else workdir.dir, progress, say)


def rounding_path(recipe: Recipe, allocation: Allocation) -> str:
    """How the planned Linears get their codes: "joint" (a method that rounds the whole model, DiscQuant),
    "database" (the allocator already rounded every Linear, EvoPress) or "sequential" (block by block)."""
    if joint(recipe.round.method):
        return "joint"
    return "database" if allocation.weights is not None else "sequential"


def round_model(model: nn.Module, arch: models.Arch, allocation: Allocation, ids: Tensor | None, recipe: Recipe,
                device: str | torch.device, workdir: WorkDir | None, progress: Progress | None,
                say: Callable[[str], None], source: Any = None) -> tuple[list[BlockReport], dict[str, Any]]:
    """Round every Linear of the allocation's plan: (block reports, what a joint rounding reports)."""
    rnd, c, plan = recipe.round, recipe.calibrate, allocation.plan
    path = rounding_path(recipe, allocation)
    if path == "joint":
        assert ids is not None
        weights, rounding = METHODS[rnd.method].round_model(
            model, plan, ids, rnd.config, device=device, log=say,
            workdir=None if workdir is None else workdir.dir / rnd.method)
        return sequential.assemble(model, plan, weights.__getitem__, progress=progress), rounding
    if path == "database":
        assert allocation.weights is not None
        return sequential.assemble(model, plan, allocation.weights, progress=progress), {}
    n = len(models.blocks_of(model, arch))
    rc = recipe.reconstruct
    train_block = None
    if rc.epochs:
        def train_block(block: nn.Module, inputs: Any, targets: Any, calls: Any) -> tuple[float, float]:
            return reconstruct.train_block(block, inputs, targets, calls, rc, torch.device(device))
    blocks = sequential.run(model, arch, plan, METHODS[rnd.method], rnd.config, ids, batch_size=c.batch_size,
                            true_sequential=c.true_sequential, device=device,
                            resume=None if workdir is None else saved_blocks(model, arch, plan, workdir),
                            on_block_done=None if workdir is None else lambda i, b: workdir.save_block(i, b, n),
                            progress=progress, source=source, max_memory=int(c.max_memory * 1e9),
                            spill_dir=None if workdir is None else workdir.dir / "hidden", reconstruct=train_block)
    return blocks, {}


def saved_blocks(model: nn.Module, arch: models.Arch, plan: Plan,
                 workdir: WorkDir) -> Callable[[int], dict[str, Tensor] | None]:
    """`workdir.load_block`, with a file whose tensors do not fit the block (other keys, shapes or storage dtypes:
    another plan's, or damaged) treated as missing: it is recomputed rather than half loaded."""
    blocks = models.blocks_of(model, arch)

    def load(i: int) -> dict[str, Tensor] | None:
        state = workdir.load_block(i)
        why = None if state is None else misfit(blocks[i], f"{arch.blocks}.{i}", plan, state)
        if why is not None:
            workdir.drop_block(i, f"does not fit block {i} ({why})")
            return None
        return state

    return load


def misfit(block: nn.Module, prefix: str, plan: Plan, state: dict[str, Tensor]) -> str | None:
    """Why `state` cannot be loaded into `block` once its planned Linears are packed (None: it can): what
    `block.load_state_dict` would refuse (missing or unexpected keys, shapes), and packed tensors of another
    storage dtype, which it would silently convert."""
    want = {k: (tuple(v.shape), None) for k, v in block.state_dict().items()}
    for name, lin in sequential.block_linears(block, prefix, plan).items():
        rel = name[len(prefix) + 1 :]
        want = {k: v for k, v in want.items() if not k.startswith(f"{rel}.")}
        try:
            spec = sequential.saved_spec(plan[name], state, rel)
            packed = codecs.of(spec).buffers(spec, lin.out_features, lin.in_features)
        except (CompressError, KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            return f"{rel}: {str(e)[:80]}"
        want |= {f"{rel}.{k}": (tuple(shape), dt) for k, (shape, dt) in packed.items()}
        if lin.bias is not None:
            want[f"{rel}.bias"] = (tuple(lin.bias.shape), None)
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        return "; ".join(f"{what} {', '.join(keys[:2])}" + (" ..." if len(keys) > 2 else "")
                         for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
    for k, (shape, dt) in want.items():
        if tuple(state[k].shape) != shape or (dt is not None and state[k].dtype != dt):
            return f"{k} is {state[k].dtype} {tuple(state[k].shape)}, the block needs {dt or 'shape'} {shape}"
    return None


def final_plan(model: nn.Module, planned: Plan) -> Plan:
    """The plan as the modules hold it: a rounding may complete a spec (PB-LLM's salient count and index,
    the MST sign storage), so the checkpoint's plan is read back from the packed Linears."""
    return Plan({n: model.get_submodule(n).spec for n in planned})


def run_distill(model: nn.Module, learn: Distillation, kd: distill.Config, workdir: WorkDir | None,
                device: str | torch.device, say: Callable[[str], None]) -> dict[str, Any]:
    """The distillation stage; returns what it did, for the summary and the model card."""
    t0 = time.perf_counter()
    ids = learn.windows
    history = distill.distill(model, learn.teacher, ids, kd, workdir=None if workdir is None else workdir.dir,
                              device=device, log=say, hidden_teacher=learn.dense)
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


def distill_windows(model: nn.Module, ids: Tensor, kd: distill.Config, batch_size: int, device: torch.device,
                    workdir: WorkDir | None, say: Callable[[str], None]) -> Tensor:
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
    say(f"distill: the dense model writes {len(ids)} windows of {ids.shape[1]} tokens "
                      f"from {kd.prompt_tokens}-token prompts")
    out = teacher.generate(model, ids[:, : kd.prompt_tokens], ids.shape[1], batch_size, device, seed=kd.seed)
    if path is not None:
        atomic_write(path, lambda tmp: save_file({"ids": out.contiguous()}, tmp))
    return out


def allocate(ctx: Context, workdir: WorkDir | None) -> Allocation:
    """Run the recipe's allocator; a plan found in the work directory (interrupted run) is reused."""
    method = ctx.recipe.allocate.method
    saved = None if workdir is None else workdir.load_json("allocation")
    if saved is not None and saved.get("method") == method:
        log.info("reusing the allocation of the interrupted run")
        return Allocation(Plan.from_json(saved["plan"]), summary=saved["summary"])
    allocation = ALLOCATORS[method].allocate(ctx, ctx.recipe.allocate.config)
    if workdir is not None and allocation.weights is None:  # (an allocator that rounds resumes on its own)
        workdir.save_json("allocation", {"method": method, "plan": allocation.plan.to_json(),
                                         "summary": allocation.summary})
    return allocation
