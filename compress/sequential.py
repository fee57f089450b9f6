"""The block-by-block calibration driver (GPTQ's `llama_sequential`, for any architecture in ARCHS).

1. Capture the inputs of block 0 for every calibration batch (a `_Catcher` stands in for the block
   list and stops the forward pass).
2. For each block: move it to the device in float32; for each group of its Linears (all at once, or
   GPTQ's true-sequential order), run the calibration batches with hooks that accumulate each
   Linear's Hessian H = 2/n Σ x xᵀ, round the Linears and swap them for packed `CompressedLinear`s;
   then run the now-compressed block to produce the next block's inputs, and move it back.
3. Only one block's Hessians live at once; the model never leaves its stored dtype except the block
   in hand. A finished block can be handed to `on_block_done` (the resumable work directory).

Methods that need no Hessian (RTN) skip calibration entirely.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from compress import codecs, models
from compress.errors import CompressError
from compress.models import Arch, block_output, blocks_of
from compress.nn import CompressedLinear, set_module, swap_linears
from compress.plan import LayerSpec, LayerWeight, Plan
from compress.reports import BlockReport, LayerReport, Progress, RoundLayer
from compress.util import trim_memory

log = logging.getLogger(__name__)


class Hessian:
    """Running H = 2/n Σ x xᵀ over calibration sequences (n counts sequences, as the reference); with `asymmetric`,
    also GPTAQ's cross term D = 2/n Σ (x̃ − x) xᵀ, x̃ the same token's input in the dense model (round/gptq.py)."""

    def __init__(self, K: int, device: torch.device, asymmetric: bool = False) -> None:
        self.H = torch.zeros(K, K, device=device, dtype=torch.float32)
        self.D = torch.zeros(K, K, device=device, dtype=torch.float32) if asymmetric else None
        self.paired = asymmetric  # every batch came with its dense twin
        self.n = 0
        self.tokens = 0  # rows seen (an expert sees only the tokens routed to it)

    def add(self, x: Tensor, dense: Tensor | None = None) -> None:
        """x [B, T, K] (or [T, K]): the Linear's inputs for B sequences; `dense`: the dense model's, same tokens."""
        b = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()  # [B·T, K]
        self.tokens += x.shape[0]
        scale = self.n / (self.n + b)
        self.H *= scale
        self.n += b
        x = math.sqrt(2 / self.n) * x
        self.H += x.T @ x
        if self.D is not None:
            self.D *= scale
            if dense is None or dense.numel() != x.numel():
                self.paired = False
            else:
                dx = math.sqrt(2 / self.n) * dense.reshape(x.shape).float() - x  # [B·T, K]
                self.D += dx.T @ x


class _Stop(Exception):
    pass


Call = tuple[tuple[Any, ...], dict[str, Any]]  # what a block is called with besides its hidden states
# (block, its inputs, the dense block's outputs, calls) -> block output error (before, after); trains the block
Reconstruct = Callable[[nn.Module, Sequence[Tensor], Sequence[Tensor], Sequence[Call]], tuple[float, float]]


class Spill:
    """Hidden states of the calibration batches, at most `budget` bytes of them in memory and the rest in files under
    `folder` (read back one batch at a time); a list as far as the driver is concerned. `close` deletes the files."""

    def __init__(self, budget: int = 0, folder: Path | None = None) -> None:
        self.budget, self.folder = budget, folder
        self.items: list[Tensor | Path] = []
        self.held = 0
        self._own: Path | None = None  # a temporary folder made here when none was given (removed with the object)

    def _where(self) -> Path:
        if self.folder is None:
            self._own = self.folder = Path(tempfile.mkdtemp(prefix="compress-hidden-"))
            weakref.finalize(self, shutil.rmtree, self._own, True)
        return self.folder

    def append(self, t: Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.budget and self.held + size > self.budget:
            folder = self._where()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"hidden-{id(self):x}-{len(self.items):05d}.safetensors"
            save_file({"h": t.detach().cpu().contiguous()}, path)
            self.items.append(path)
        else:
            self.items.append(t)
            self.held += size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor:
        item = self.items[i]
        return load_file(item)["h"] if isinstance(item, Path) else item

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        for item in self.items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        if self._own is not None:
            shutil.rmtree(self._own, ignore_errors=True)
        self.items, self.held = [], 0


@dataclass
class Captured:
    """What the model hands its blocks for each calibration batch: block 0's hidden states, and every block's
    other arguments (masks and position embeddings differ per block where sliding-window and global layers mix,
    e.g. Gemma 3's local and global rotary tables)."""

    hidden: list[Tensor] | Spill  # [batch] block 0's input [B, T, K], in the model's dtype
    calls: list[list[Call]]  # [block][batch] positional arguments after the hidden states, keyword arguments


class _StandIn(nn.Module):
    """Takes one block's place in the model's layer loop; attributes the model reads off its layers (e.g.
    `attention_type`) come from the block it stands in for."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.__dict__["_block"] = block  # not registered: the stand-in owns no parameters

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


class _Catcher(_StandIn):
    """Stands in for one block during the capture pass: records its call and passes the hidden states through
    (the next stand-in records what the model computes for its block); the last one stops the forward."""

    def __init__(self, block: nn.Module, calls: list[Call], hidden: list[Tensor] | Spill | None, last: bool) -> None:
        super().__init__(block)
        self.calls, self.hidden, self.last = calls, hidden, last

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        h, args = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        self.calls.append((args, kwargs))
        if self.hidden is not None:
            self.hidden.append(h)
        if self.last:
            raise _Stop
        return h


@torch.no_grad()
def capture_inputs(model: nn.Module, arch: Arch, windows: Tensor, batch_size: int, device: torch.device,
                   spill: Spill | None = None) -> Captured:
    """Run the model's embedding and block-argument code for each batch of windows [n, T], with every block
    replaced by a stand-in (no block runs); return block 0's hidden states (into `spill` if given) and every
    block's arguments."""
    parent_name, _, attr = arch.blocks.rpartition(".")
    parent = model.get_submodule(parent_name)
    blocks = getattr(parent, attr)
    cap = Captured(spill if spill is not None else [], [[] for _ in blocks])
    stand_ins = [_Catcher(b, cap.calls[i], cap.hidden if i == 0 else None, i == len(blocks) - 1)
                 for i, b in enumerate(blocks)]
    setattr(parent, attr, nn.ModuleList(stand_ins))
    try:
        model.to(device)  # the blocks are detached: only embeddings, norms, rotary tables move
        for i in range(0, windows.shape[0], batch_size):
            with suppress(_Stop):
                model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
    finally:
        model.to("cpu")  # (before the blocks are back: streamed ones are on the meta device)
        setattr(parent, attr, blocks)
    if any(len(c) != len(cap.hidden) for c in cap.calls):
        raise CompressError(f"the model did not call each of its {len(blocks)} blocks ({arch.blocks}) once per "
                            "batch; its layer loop is not understood (add it to compress.models.ARCHS)")
    return cap


@contextmanager
def _input_hooks(modules: dict[str, nn.Module], on_input: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Call on_input(name, x) with each module's input on every forward while the context is open."""
    handles = [m.register_forward_hook(lambda _m, inp, _out, name=name: on_input(name, inp[0].detach()))
               for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _hessian_hooks(modules: dict[str, nn.Linear], device: torch.device,
                   dense: dict[str, list[Tensor]] | None = None) -> Iterator[dict[str, Hessian]]:
    """Hooks accumulating each Linear's Hessian; with `dense` (name -> a one-slot list holding the dense twin's
    input of the current batch, filled by `_capture_hooks`), GPTAQ's cross term too."""
    hs = {name: Hessian(m.in_features, device, dense is not None and name in dense) for name, m in modules.items()}

    def add(name: str, x: Tensor) -> None:
        hs[name].add(x, dense[name].pop() if dense is not None and dense.get(name) else None)

    with _input_hooks(modules, add):
        yield hs


@contextmanager
def _capture_hooks(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[Tensor]]]:
    """name -> a one-slot list that receives the Linear's input on each call (the dense twin's, for GPTAQ)."""
    slots: dict[str, list[Tensor]] = {name: [] for name in modules}

    def keep(name: str, x: Tensor) -> None:
        slots[name][:] = [x]

    with _input_hooks(modules, keep):
        yield slots


MIN_EXPERT_TOKENS = 32  # an expert's Linear that saw fewer calibration tokens takes its siblings' pooled Hessian


def _expert_role(name: str) -> str | None:
    """`...mlp.experts.*.down_proj` for the Linears of one expert of a block (compress/moe.py), else None."""
    m = re.fullmatch(r"(.*\.experts)\.\d+\.(.*)", name)
    return f"{m[1]}.*.{m[2]}" if m else None


def pool_rare_experts(hs: dict[str, Hessian]) -> dict[str, str]:
    """Experts that few calibration tokens were routed to get a Hessian they can be rounded with: the pooled one of
    the same Linear of every expert of the block (token-weighted; their own tokens included). Returns what was done
    per Linear (it goes into the layer's report). No token for any expert of a Linear is an error."""
    roles: dict[str, list[str]] = {}
    for name in hs:
        role = _expert_role(name)
        if role is not None:
            roles.setdefault(role, []).append(name)
    notes = {}
    for role, names in roles.items():
        rare = [n for n in names if hs[n].tokens < MIN_EXPERT_TOKENS]
        if not rare:
            continue
        total = sum(hs[n].tokens for n in names)
        if total == 0:
            raise CompressError(f"no calibration token was routed to any expert of {role}; calibrate on more or "
                                "longer windows (calibrate.samples, calibrate.seqlen)")
        pooled = sum(hs[n].H * (hs[n].n / 2) for n in names) / total  # Σ x xᵀ over every routed token / tokens
        for n in rare:
            notes[n] = f"pooled Hessian of {len(names)} experts ({hs[n].tokens} own tokens of {total})"
            hs[n].H = pooled
        log.info("%s: %d of %d experts saw fewer than %d calibration tokens and use the pooled Hessian", role,
                 len(rare), len(names), MIN_EXPERT_TOKENS)
    return notes


def _run_block(block: nn.Module, hidden: Sequence[Tensor], calls: Sequence[Call], device: torch.device,
               keep: bool, outs: list[Tensor] | Spill | None = None) -> list[Tensor] | Spill:
    """Run block on every captured batch in float32; return the outputs (in the inputs' dtype, into `outs` if
    given) if keep."""
    outs = [] if outs is None else outs
    for h, (args, kw) in zip(hidden, calls, strict=True):
        y = block_output(block(h.to(device, torch.float32), *models.to_device(args, device),
                                  **models.to_device(kw, device)))
        if not torch.isfinite(y).all():
            raise CompressError("a block produced NaN/inf activations during calibration; load the model in "
                                "float32 (--dtype float32) or check the calibration data")
        if keep:
            outs.append(y.to(h.dtype))
    return outs


def round_linear(name: str, lin: nn.Linear, H: Tensor | None, spec: Any, method: ModuleType,
                 cfg: Any, D: Tensor | None = None) -> tuple[CompressedLinear, LayerReport]:
    """Round one Linear with `method` and pack it; the pure method never sees modules or devices. D: GPTAQ's cross
    term, for a method that takes it."""
    t0 = time.perf_counter()
    lw = LayerWeight(lin.weight.detach().float(), spec)
    try:
        out = method.apply(lw, H, cfg) if D is None else method.apply(lw, H, cfg, D=D)
    except CompressError as e:
        raise CompressError(f"{name}: {e}") from e
    loss = float(out.loss.sum()) if out.loss is not None else float("nan")
    bias = None if lin.bias is None else lin.bias.detach()
    packed = CompressedLinear.from_weight(out, bias)
    col_loss = None if out.loss is None else out.loss.detach().cpu()
    return packed, LayerReport(name, loss, time.perf_counter() - t0, dict(out.info), col_loss, lin.weight.numel())


def block_linears(block: nn.Module, prefix: str, plan: Plan) -> dict[str, nn.Linear]:
    return {f"{prefix}.{n}": m for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and f"{prefix}.{n}" in plan}


def _groups(arch: Arch, prefix: str, linears: dict[str, nn.Linear], true_sequential: bool) -> list[list[str]]:
    if not true_sequential:
        return [list(linears)]
    groups = [[f"{prefix}.{n}" for n in g if f"{prefix}.{n}" in linears] for g in arch.sequential]
    rest = [n for n in linears if not any(n in g for g in groups)]
    return [g for g in [*groups, rest] if g]


@dataclass
class Twin:
    """GPTAQ's dense twin of the block in hand: a float32 copy of it before rounding, and the dense model's hidden
    states entering it (the dense stream runs beside the quantized one, block by block)."""

    block: nn.Module
    prefix: str
    hidden: Sequence[Tensor]


def _statistics(block: nn.Module, mods: dict[str, nn.Linear], hidden: Sequence[Tensor], calls: Sequence[Call],
                device: torch.device, twin: Twin | None) -> dict[str, Hessian]:
    """Each Linear's Hessian over the calibration batches; with a twin, each batch runs through the dense copy first
    so that every Linear's quantized-model input meets the dense model's input for the same tokens."""
    if twin is None:
        with _hessian_hooks(mods, device) as hs:
            _run_block(block, hidden, calls, device, keep=False)
        return hs
    # (a routed expert sees other tokens in the two streams: no token-by-token pairing, so no cross term)
    dense_mods = {n: twin.block.get_submodule(n[len(twin.prefix) + 1 :]) for n in mods if _expert_role(n) is None}
    with _capture_hooks(dense_mods) as slots, _hessian_hooks(mods, device, slots) as hs:
        for h, dense_h, call in zip(hidden, twin.hidden, calls, strict=True):
            for slot in slots.values():  # (an expert the dense stream routed nothing to this batch has no twin)
                slot.clear()
            _run_block(twin.block, [dense_h], [call], device, keep=False)
            _run_block(block, [h], [call], device, keep=False)
    return hs


def _round_block(model: nn.Module, block: nn.Module, groups: list[list[str]], plan: Plan, round_layer: RoundLayer,
                 needs_hessian: bool, hidden: Sequence[Tensor], calls: Sequence[Call],
                 device: torch.device, twin: Twin | None = None) -> list[LayerReport]:
    """Round the block's Linears group by group; each group's Hessians see the earlier groups compressed."""
    reports = []
    for group in groups:
        mods = {n: model.get_submodule(n) for n in group}
        hs: dict[str, Hessian] = _statistics(block, mods, hidden, calls, device, twin) if needs_hessian else {}
        notes = pool_rare_experts(hs) if hs else {}
        for name, lin in mods.items():
            h = hs.pop(name) if hs else None  # each Hessian is freed once its Linear is rounded
            # (a routed expert, or one on its siblings' pooled Hessian: plain GPTQ, said in its report)
            packed, rep = _round_on(round_layer, name, lin, h, plan[name], twin is not None, pooled=name in notes)
            del h
            if name in notes:
                rep.info["hessian"] = notes[name]
            set_module(model, name, packed)
            reports.append(rep)
        hs.clear()  # free this group's Hessians before the next group's
        trim_memory()
    return reports


def _round_on(round_layer: RoundLayer, name: str, lin: nn.Linear, h: Hessian | None, spec: LayerSpec,
              dense_stream: bool, pooled: bool = False) -> tuple[CompressedLinear, LayerReport]:
    """Round one Linear on its Hessian, with GPTAQ's cross term where every batch had its dense twin and the Hessian
    is its own (not pooled); with a dense stream, the report says which (info["asymmetric"])."""
    if h is not None and h.D is not None and h.paired and not pooled:
        packed, rep = round_layer(name, lin, h.H, spec, D=h.D)  # type: ignore[call-arg]
        rep.info["asymmetric"] = 1.0
    else:
        packed, rep = round_layer(name, lin, None if h is None else h.H, spec)
        if dense_stream:
            rep.info["asymmetric"] = 0.0
    return packed, rep


def saved_spec(spec: LayerSpec, state: dict[str, Tensor], rel: str) -> LayerSpec:
    """The spec a saved block's Linear `rel` was packed with (its codec reads back what the rounding decided,
    e.g. a binary layer's salient size and index)."""
    own = {k[len(rel) + 1 :]: v for k, v in state.items() if k.startswith(f"{rel}.")}
    return codecs.of(spec).saved_spec(spec, own)


@torch.no_grad()
def run(model: nn.Module, arch: Arch, plan: Plan, method: ModuleType, cfg: Any, windows: Tensor | None, *,
        batch_size: int = 8, true_sequential: bool = False, device: torch.device | str = "cpu",
        resume: Callable[[int], dict[str, Tensor] | None] | None = None,
        on_block_done: Callable[[int, nn.Module], None] | None = None,
        progress: Progress | None = None, round_layer: RoundLayer | None = None,
        restore: bool = False, stage: str = "round", kept: dict[str, nn.Module] | None = None,
        source: Any = None, max_memory: int = 0, spill_dir: Path | None = None,
        reconstruct: Reconstruct | None = None) -> list[BlockReport]:
    """Compress every Linear in `plan`, block by block; the model is modified in place.

    With a `source` (compress/lazy.py) the blocks are on the meta device: each is fetched from the shards when its
    turn comes (or loaded from its resumed state) and released again once `on_block_done` has saved it.
    `max_memory` (bytes, 0: no limit) bounds the calibration hidden states held in memory; the rest go to files in
    `spill_dir` (a temporary folder if None) and are read back one batch at a time.

    `resume(i)` may return the saved state of an already finished block i (it is loaded, not recomputed);
    `on_block_done(i, block)` is called after each newly compressed block (to save it).
    `round_layer` replaces the default (round with `method`/`cfg` and pack), e.g. to build a level database.
    `reconstruct(block, inputs, targets, calls) -> (error before, after)` trains each freshly rounded block toward
    the dense block's outputs (compress/reconstruct.py), the dense stream running beside the quantized one.
    `restore=True` puts every dense Linear back after its block has produced the next block's inputs: the
    model ends unchanged and the reports carry what the rounding measured (BAQ's first pass); `kept`, if
    given, receives the rounded modules that were taken out (on the CPU), to score that model later.
    """
    asymmetric = round_layer is None and getattr(cfg, "asymmetric", 0.0) > 0  # GPTAQ: a dense stream runs beside
    dense_stream = asymmetric or reconstruct is not None
    if round_layer is None:
        def round_layer(name: str, lin: nn.Linear, H: Tensor | None, spec: Any,
                        D: Tensor | None = None) -> tuple[CompressedLinear, LayerReport]:
            return round_linear(name, lin, H, spec, method, cfg, D)
    device = torch.device(device)
    blocks = blocks_of(model, arch)
    if cfg.needs_hessian and windows is None:
        raise CompressError(f"{method.__name__.rsplit('.', 1)[-1]} needs calibration windows")

    def store() -> Spill | None:
        return Spill(max_memory, spill_dir) if max_memory else None

    if max_memory and spill_dir is not None:
        shutil.rmtree(spill_dir, ignore_errors=True)  # an interrupted run's spilled states are of no further use

    cap = (capture_inputs(model, arch, windows, batch_size, device, store()) if cfg.needs_hessian
           else Captured([], []))
    hidden = dense_hidden = cap.hidden  # (the dense stream: GPTAQ's; the same states until block 0 is rounded)
    reports = []
    head = plan.head  # the output head (weights.lm_head): rounded after the last block, on the last block's outputs
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        prefix = f"{arch.blocks}.{i}"
        more = i + 1 < len(blocks) or head is not None  # something reads this block's outputs
        dtype = next(block.parameters()).dtype
        linears = block_linears(block, prefix, plan)
        state = resume(i) if resume is not None else None
        if source is not None and (state is None or dense_stream):  # (the dense stream needs the dense block)
            source.fetch(i)
            linears = block_linears(block, prefix, plan)
        twin = (Twin(copy.deepcopy(block).to(device, torch.float32), prefix, dense_hidden)
                if dense_stream and (state is None or more) else None)
        layer_reports: list[LayerReport] = []
        if state is not None:
            swap_linears(model, Plan({n: saved_spec(plan[n], state, n[len(prefix) + 1 :]) for n in linears}))
            block.load_state_dict(state, assign=source is not None)  # (assign: a streamed block is on meta)
        block.to(device, torch.float32)
        if state is None:
            groups = _groups(arch, prefix, linears, true_sequential)
            layer_reports = _round_block(model, block, groups, plan, round_layer, cfg.needs_hessian, hidden,
                                         cap.calls[i] if cap.calls else [], device, twin if asymmetric else None)
        dense_out = None  # the dense block's outputs on the dense stream: the next dense states, and the targets
        if twin is not None and cfg.needs_hessian and (reconstruct is not None or more):
            dense_out = _run_block(twin.block, dense_hidden, cap.calls[i], device, keep=True, outs=store())
        info: dict[str, float] = {}
        if reconstruct is not None and state is None and dense_out is not None:
            info["recon_before"], info["recon_after"] = reconstruct(block, hidden, dense_out, cap.calls[i])
        if cfg.needs_hessian and more:
            done, hidden = hidden, _run_block(block, hidden, cap.calls[i], device, keep=True, outs=store())
            if dense_out is not None:
                dense_done, dense_hidden = dense_hidden, dense_out
                if isinstance(dense_done, Spill) and dense_done is not done:
                    dense_done.close()
            if isinstance(done, Spill):
                done.close()
        elif isinstance(dense_out, Spill):
            dense_out.close()
        twin = None  # (frees the dense copy before the next block's)
        if restore:
            for name, lin in linears.items():
                if kept is not None:
                    kept[name] = model.get_submodule(name).to("cpu")
                set_module(model, name, lin)
        block.to("cpu", dtype)
        if on_block_done is not None and state is None:
            on_block_done(i, block)
        if source is not None:
            source.release(i)
        trim_memory()  # (the freed block, Hessians and workspaces back to the OS: the peak stays flat over depth)
        rep = BlockReport(i, len(blocks), time.perf_counter() - t0, layer_reports, resumed=state is not None,
                          stage=stage, info=info)
        reports.append(rep)
        if progress is not None:
            progress(rep)
    if head is not None:
        t0 = time.perf_counter()
        dense = model.get_submodule(head)
        rep_head = _round_head(model, arch, head, plan, round_layer, hidden if cfg.needs_hessian else None,
                               dense_hidden if asymmetric else None, windows, batch_size, device)
        if restore:
            if kept is not None:
                kept[head] = model.get_submodule(head)
            set_module(model, head, dense)
        rep = BlockReport(0, 1, time.perf_counter() - t0, [rep_head], stage=f"{stage}: output head")
        reports.append(rep)
        if progress is not None:
            progress(rep)
    for states in {id(hidden): hidden, id(dense_hidden): dense_hidden}.values():
        if isinstance(states, Spill):
            states.close()
    return reports


class _Replay(_StandIn):
    """Stands in for one block while the model's code after the blocks runs: passes the hidden states through, and
    the last one hands over the last block's outputs computed earlier (`out`, one batch)."""

    def __init__(self, block: nn.Module, out: list[Tensor] | None) -> None:
        super().__init__(block)
        self.out = out

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        h = args[0] if args else kwargs["hidden_states"]
        return self.out[0].to(h.device, h.dtype) if self.out is not None else h


@torch.no_grad()
def head_inputs(model: nn.Module, arch: Arch, streams: Sequence[Sequence[Tensor]], windows: Tensor, batch_size: int,
                device: torch.device) -> Iterator[list[Tensor]]:
    """The output head's inputs [B, T, K] for each calibration batch, one per stream of last-block outputs
    (`streams`: [stream][batch][B, T, d], e.g. the rounded and the dense model's): the model's own code after the
    blocks (final norm, any projection) runs with every block a stand-in, and the head's input is taken as it is
    called (the head itself does not run)."""
    parent_name, _, attr = arch.blocks.rpartition(".")
    parent = model.get_submodule(parent_name)
    blocks = getattr(parent, attr)
    slot: list[Tensor] = []
    got: list[Tensor] = []

    def catch(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        got.append(args[0].detach())
        raise _Stop

    handle = model.get_output_embeddings().register_forward_pre_hook(catch)
    setattr(parent, attr, nn.ModuleList([_Replay(b, slot if i == len(blocks) - 1 else None)
                                         for i, b in enumerate(blocks)]))
    try:
        model.to(device)  # (the blocks are detached: embeddings, norms and the head move)
        for b, start in enumerate(range(0, windows.shape[0], batch_size)):
            for k, final in enumerate(streams):
                slot[:] = [final[b]]
                with suppress(_Stop):
                    model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
                if len(got) != k + 1:
                    raise CompressError("the model did not call its output head once after its blocks; "
                                        "weights.lm_head cannot be calibrated for it (set weights.lm_head=false)")
            yield got[:]
            got.clear()
    finally:
        handle.remove()
        model.to("cpu")
        setattr(parent, attr, blocks)


def _round_head(model: nn.Module, arch: Arch, name: str, plan: Plan, round_layer: RoundLayer,
                final: Sequence[Tensor] | None, dense_final: Sequence[Tensor] | None, windows: Tensor | None,
                batch_size: int, device: torch.device) -> LayerReport:
    """Round the output head on its own inputs (the final norm of the last rounded block's outputs); with the dense
    stream's outputs too, GPTAQ's cross term. Data-free methods get no Hessian."""
    lin = model.get_submodule(name)
    h = None
    if final is not None:
        assert windows is not None
        h = Hessian(lin.in_features, device, dense_final is not None)
        streams = [final] if dense_final is None else [final, dense_final]
        for xs in head_inputs(model, arch, streams, windows, batch_size, device):
            h.add(xs[0], xs[1] if len(xs) > 1 else None)
    packed, rep = _round_on(round_layer, name, lin, h, plan[name], dense_final is not None)
    set_module(model, name, packed.to(lin.weight.dtype))
    return rep


@torch.no_grad()
def assemble(model: nn.Module, plan: Plan, weights: Callable[[str], LayerWeight],
             progress: Progress | None = None) -> list[BlockReport]:
    """Swap in Linears that were rounded elsewhere (a level database): no calibration pass at all."""
    t0 = time.perf_counter()
    reports = []
    for name in plan:
        lin = model.get_submodule(name)
        lw = weights(name)
        bias = None if lin.bias is None else lin.bias.detach()
        set_module(model, name, CompressedLinear.from_weight(lw, bias).to(lin.weight.device))
        loss = float(lw.loss.sum()) if lw.loss is not None else float("nan")
        reports.append(LayerReport(name, loss, 0.0, dict(lw.info), None, lin.weight.numel()))
    rep = BlockReport(0, 1, time.perf_counter() - t0, reports, stage="assemble")
    if progress is not None:
        progress(rep)
    return [rep]


@torch.no_grad()
def probe(model: nn.Module, arch: Arch, plan: Plan, method: ModuleType, cfg: Any, windows: int, seqlen: int,
          source: Any = None) -> tuple[float, float]:
    """(seconds of block 0's float32 forward per calibration window, seconds to round its planned Linears) on
    `windows` windows of random tokens, through the driver's own code; the model is left as it was (a streamed
    block 0 is released again)."""
    device = torch.device("cpu")
    blocks = blocks_of(model, arch)
    block = source.fetch(0) if source is not None else blocks[0]
    dtype = next(block.parameters()).dtype
    try:
        prefix = f"{arch.blocks}.0"
        linears = block_linears(block, prefix, plan)
        ids = torch.randint(0, int(model.config.vocab_size), (windows, seqlen), generator=torch.Generator())
        cap = capture_inputs(model, arch, ids, windows, device)
        block.to(device, torch.float32)
        with _hessian_hooks(linears, device) as hs:
            t0 = time.perf_counter()
            _run_block(block, cap.hidden, cap.calls[0], device, keep=False)
            forward = (time.perf_counter() - t0) / windows
        t0 = time.perf_counter()
        for name, lin in linears.items():
            round_linear(name, lin, hs[name].H if cfg.needs_hessian else None, plan[name], method, cfg)
        return forward, time.perf_counter() - t0
    finally:
        block.to("cpu", dtype)
        if source is not None:
            source.release(0)
