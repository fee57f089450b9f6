"""What the training stages (DiscQuant, distillation) share: the learning-rate schedule, the data order, and
the loop around a method's loss (`Trainer`: optimiser and schedule steps, a resumable state, progress).

The schedule and the windows are functions of the step alone, so an interrupted run that resumes from a
saved step sees the same learning rates and the same windows as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from compress import parallel, util
from compress.errors import CompressError


def warmup_cosine(step: int, warmup: int, steps: int) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def step_windows(step: int, per_step: int, n: int, seed: int) -> list[int]:
    """Indices into a pool of n windows for optimiser step `step`: the pool is walked in a fresh seeded
    permutation every epoch, `per_step` windows per step."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, j = divmod(i, n)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[j]))
    return out


# --- the loop ---------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """A finished optimiser step, for `on_step` callbacks and the log."""

    step: int  # steps done
    steps: int
    loss: float  # this step's training loss
    seconds: float  # since this run started (or resumed)
    eta: float  # seconds left at this run's pace
    history: list[float]  # every step's loss so far
    metrics: dict[str, float] = field(default_factory=dict)  # the method's own (e.g. kl, at_vertex, tokens_per_s)


class Trainer:
    """The loop around a method's loss: `opt` over the named `params` with linear warm-up + cosine decay,
    a resumable state file, progress with an ETA, and a log line every `log_every` steps.

        trainer = Trainer("distill", params, opt, steps=..., warmup=..., state=workdir / "x.safetensors")
        for _ in trainer.resume():                   # the steps left (all of them without a saved state)
            trainer.step(loss_fn, project)           # loss_fn(step): forward + backward(s), returns the loss
            trainer.log(on_step, metrics)

    The state file is safetensors: the trained tensors and the optimiser's, with the rest (step, loss
    history, optimiser and schedule settings) as JSON in its header. It is written whole (util.atomic_write)
    by rank 0 every `save_every` steps and after the last; every process holds the same state.
    """

    def __init__(self, name: str, params: Mapping[str, Tensor], opt: torch.optim.Optimizer, *, steps: int,
                 warmup: int, state: Path | None = None, save_every: int = 32, log_every: int = 8,
                 describe: Callable[[Progress], str] = lambda p: f"loss {p.loss:.4f}", lr_key: str = "lr",
                 say: Callable[[str], None] | None = None) -> None:
        self.name, self.params, self.opt, self.steps = name, params, opt, steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, steps))
        self.state, self.save_every, self.log_every = state, save_every, log_every
        self.describe, self.lr_key, self.say = describe, lr_key, say or (lambda s: None)
        self.start = self.done = 0
        self.history: list[float] = []
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def resume(self) -> range:
        """Load the saved state if there is one; returns the steps left to run."""
        if self.state is not None and self.state.is_file():
            self.load()
            self.say(f"{self.name}: resuming at step {self.start}/{self.steps}")
        self.t0 = time.perf_counter()
        return range(self.start, self.steps)

    def step(self, loss_fn: Callable[[int], float], project: Callable[[int], None] | None = None) -> float:
        """One optimiser step: zero the gradients, `loss_fn(step)` (the forward and backward passes) returns the
        step's loss, the optimiser and the schedule step, `project(step)` (under no_grad) puts the trained
        tensors back where they may live, and the state is saved when due. Returns the loss."""
        step = self.done
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(step)
        if not math.isfinite(loss):
            raise CompressError(f"{self.name}: the training loss became {loss} at step {step}; lower {self.lr_key}")
        self.opt.step()
        self.sched.step()
        if project is not None:
            with torch.no_grad():
                project(step)
        self.history.append(loss)
        self.done = step + 1
        if self.done % self.save_every == 0 or self.done == self.steps:
            self.save()
        return loss

    def log(self, on_step: Callable[[Progress], None] | None = None,
            metrics: Callable[[], dict[str, float]] = dict) -> None:
        """Report the step just done: to `on_step` after every step, to the log every `log_every` steps and
        after the last (rank 0). `metrics` is evaluated only when something reports."""
        due = self.done % self.log_every == 0 or self.done == self.steps
        if not due and on_step is None:
            return
        el = self.elapsed
        prog = Progress(self.done, self.steps, self.history[-1], el,
                        el / (self.done - self.start) * (self.steps - self.done), self.history, metrics())
        if on_step is not None:
            on_step(prog)
        if due and parallel.is_main():
            self.say(f"{self.name} step {prog.step}/{prog.steps}: {self.describe(prog)}, ETA {prog.eta:.0f}s")

    def save(self) -> None:
        """Write the state file (rank 0; nothing without a state file)."""
        if self.state is None or not parallel.is_main():
            return
        tensors: dict[str, Tensor] = {}
        seen: dict[int, str] = {}
        for n, p in self.params.items():
            _pack(p, f"param.{n}", tensors, seen)
        meta = {"step": self.done, "history": self.history, "opt": _pack(self.opt.state_dict(), "opt", tensors, seen),
                "sched": _pack(self.sched.state_dict(), "sched", tensors, seen)}
        header = {"trainer": json.dumps(meta)}
        util.atomic_write(self.state, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    def load(self) -> None:
        """Restore the state file's tensors, optimiser, schedule, step and history (tensors onto the device of
        the trained tensors, as the optimiser keeps them there)."""
        assert self.state is not None
        device = next(iter(self.params.values())).device
        with safe_open(self.state, framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            meta = json.loads((f.metadata() or {})["trainer"])
        saved = {k.removeprefix("param.") for k in tensors if k.startswith("param.")}
        if saved != set(self.params):
            raise CompressError(f"{self.state} holds the state of another training (other tensors); delete it "
                                "to start over")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"param.{n}"])
        self.opt.load_state_dict(_unpack(meta["opt"], tensors))
        self.sched.load_state_dict(_unpack(meta["sched"], tensors))
        self.start = self.done = meta["step"]
        self.history = meta["history"]


@contextmanager
def checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing on `model` for the body when `enabled` (and the model supports it); Hugging Face
    models checkpoint only in train mode, so the body then runs in train mode. The mode is restored after."""
    was_training = model.training
    on = enabled and hasattr(model, "gradient_checkpointing_enable")
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # (Llama has no dropout)
    try:
        yield
    finally:
        if on:
            model.gradient_checkpointing_disable()
        model.train(was_training)


def _pack(obj: Any, key: str, tensors: dict[str, Tensor], seen: dict[int, str]) -> Any:
    """`obj` (a state_dict) as JSON, its tensors moved into `tensors` under dotted keys; a tensor met twice
    (e.g. an 8-bit optimiser's shared quantisation map) is stored once."""
    if isinstance(obj, Tensor):
        if id(obj) not in seen:
            seen[id(obj)] = key
            tensors[key] = obj.detach().contiguous()
        return {"tensor": seen[id(obj)]}
    if isinstance(obj, dict):  # as pairs: an optimiser's state is keyed by int
        return {"dict": [[k, _pack(v, f"{key}.{k}", tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [_pack(v, f"{key}.{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_pack(v, f"{key}.{i}", tensors, seen) for i, v in enumerate(obj)]
    return obj


def _unpack(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of `_pack`."""
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "tensor" in obj:
            return tensors[obj["tensor"]]
        if "tuple" in obj:
            return tuple(_unpack(v, tensors) for v in obj["tuple"])
        return {k: _unpack(v, tensors) for k, v in obj["dict"]}
    return obj
