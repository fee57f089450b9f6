"""The `compress` command line: argument translation and display only (rich lives here, nowhere else).

    compress MODEL --recipe NAME [--out DIR] [--set key=value ...] [--calib DATASET] [--device cpu|cuda]
    compress eval ORIGINAL COMPRESSED [--dataset pydoc] [--seqlen 512] [--windows 40] [--json PATH]
    compress recipes
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from compress import interrupt
from compress.errors import CompressError

if TYPE_CHECKING:
    import torch

    from compress.plan import Plan
    from compress.sequential import BlockReport

console = Console(stderr=True)
out_console = Console()

USAGE = """Make a language model small and compare it with the original.

  compress MODEL --recipe NAME [--out DIR] [--set key=value ...] [--calib DATASET] [--device cpu|cuda]

  compress eval ORIGINAL COMPRESSED [--dataset pydoc] [--seqlen 512] [--windows 40]

  compress export CHECKPOINT --format compressed-tensors|gptq [--out DIR]

  compress verify CHECKPOINT [--no-verify]

  compress plan MODEL --recipe NAME [--format F]

  compress recipes

Run `compress compress --help` or `compress eval --help` for every option."""

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=USAGE)
eval_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _setup(verbose: bool, threads: int | None) -> None:
    import os

    import torch

    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' own bars (GGUF conversion, shard writing)
    if threads is not None:
        _check_count("--threads", threads, 1)  # 0 would silently mean "torch's default", a negative one crashes

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])
    if threads:
        torch.set_num_threads(threads)


def _check_count(option: str, value: int, low: int) -> None:
    """Refuse a count option below `low`, naming it: click only checks that it is an integer."""
    if value < low:
        raise CompressError(f"{option} {value} is out of range; it must be >= {low}")


def _check_device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CompressError(f"--device {device!r} is not supported; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def _dtype(name: str) -> Any:
    import torch

    table = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise CompressError(f"dtype {name!r} is invalid; choose one of {', '.join(table)}")
    return table[name]


def _default_out(model: str, recipe_name: str) -> Path:
    """out/MODEL-RECIPE, both parts reduced to one safe path component (user text never leaves out/)."""
    def part(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.").lower() or "model"
    return Path("out") / f"{part(Path(model).name.removesuffix('.gguf'))}-{part(recipe_name)}"


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


class BlockTable:
    """One printed row per finished block (stage, block, Linears, loss, worst Linear, damping, seconds, ETA)
    and a live progress bar below; rows scroll away like a log, so any number of passes fits."""

    COLUMNS = (("block", 6, "right"), ("linears", 7, "right"), ("loss", 10, "right"), ("worst linear", 30, "left"),
               ("damp", 6, "right"), ("s", 7, "right"), ("ETA", 7, "right"))
    RECON = (("output error (recon)", 21, "right"),)  # shown when the recipe reconstructs blocks

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console)
        self.task = self.bar.add_task("blocks", total=total)
        self.stage, self.done_fresh, self.seconds = None, 0, 0.0

    def _table(self, header: bool, recon: bool = False) -> Table:
        t = Table(show_header=header, box=None, pad_edge=False)
        for name, width, just in self.COLUMNS + (self.RECON if recon else ()):
            t.add_column(name, width=width, justify=just, no_wrap=True)
        return t

    def __call__(self, rep: BlockReport) -> None:
        if rep.stage != self.stage:  # a new pass: its own heading, bar and ETA
            self.stage, self.done_fresh, self.seconds = rep.stage, 0, 0.0
            self.bar.update(self.task, description=rep.stage, completed=0, total=rep.total)
            console.print(f"[bold]{rep.stage}[/]")
            console.print(self._table(header=True, recon="recon_before" in rep.info))
        self.bar.update(self.task, completed=rep.index + 1)
        recon = "recon_before" in rep.info
        row = self._table(header=False, recon=recon)
        extra = (f"{rep.info['recon_before']:.3g} → {rep.info['recon_after']:.3g}",) if recon else ()
        if rep.resumed:
            row.add_row(str(rep.index), "-", "-", "resumed from .partial", "-", f"{rep.seconds:.1f}", "")
        else:
            self.done_fresh += 1
            self.seconds += rep.seconds
            eta = self.seconds / self.done_fresh * (rep.total - rep.index - 1)
            worst = max(rep.layers, key=lambda r: r.loss, default=None)
            damp = max((r.info.get("damp", 0.0) for r in rep.layers), default=0.0)
            row.add_row(
                str(rep.index), str(len(rep.layers)), f"{rep.loss:.4g}",
                f"{'.'.join(worst.name.split('.')[-2:])} {worst.loss:.3g}" if worst else "-",
                f"{damp:g}" if damp else "-", f"{rep.seconds:.1f}", f"{eta:.0f}s", *extra)
        console.print(row)


def allocation_table(plan: Plan, shapes: dict[str, tuple[int, int]], prefix: str) -> Table | None:
    """Blocks x Linear kinds; a cell is the Linear's width, or one digit per group along K when widths mix."""
    kinds: list[str] = []
    cells: dict[str, dict[str, str]] = {}
    plan = plan.without(plan.head)  # (the output head keeps the recipe's spec: the summary names it)
    for name, spec in plan.layers.items():
        block, _, kind = name.removeprefix(prefix + ".").partition(".")
        kinds += [kind] if kind not in kinds else []
        gb = spec.group_bits(shapes[name][1])
        cells.setdefault(block, {})[kind] = spec.ggml or (str(gb[0]) if len(set(gb)) == 1 else "".join(map(str, gb)))
    specs = plan.layers.values()
    if len({(s.bits, s.ggml) for s in specs}) == 1 and all(isinstance(s.bits, int) for s in specs):
        return None  # uniform: nothing to show
    typed = any(s.ggml for s in plan.layers.values())
    t = Table("block", *[k.split(".")[-1] for k in kinds],
              title="ggml type per Linear" if typed else "allocation (code bits per Linear or per group)")
    for block, row in cells.items():
        t.add_row(block, *[row.get(k, "-") for k in kinds])
    return t


def _check_formats(m: Any, rec: Any, targets: list[str], format_: str | None, display: str,
                   dtype: torch.dtype) -> None:
    """Refuse, before any work, a plan that a target format (--format, or one the recipe `serves:`) cannot hold
    when written with dense parts in `dtype` (the checkpoint's, which an export keeps by default)."""
    if not targets:
        return
    from compress import export, models
    from compress.pipeline import make_plan

    base = make_plan(m, models.arch_of(m), rec)
    shapes = {n: tuple(m.get_submodule(n).weight.shape) for n in base}
    for f in targets:
        try:
            export.check(f, base, shapes, rec, dtype, m.config)
        except CompressError as e:
            if f == format_:
                raise
            raise CompressError(f"recipe {rec.name} is made to serve as {f}, but on {display} {e}") from None


def _bytes(model: Any) -> int:
    """Bytes of a model's tensors (each stored once): about what its checkpoint takes on disk."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(seen.values())


def _write_failed(e: Exception, where: Path, what: str, need: int | None, then: str) -> Exception:
    """A failed write of the results as one line (a full disk says how much is needed, another OS error its
    cause); anything that is not a write error is returned as it is, a bug keeps its traceback."""
    from compress import workdir

    err = workdir.write_error(e)
    if err is None:
        return e
    if err.errno in workdir.SPACE:
        return workdir.space_error(err, where, what, None if need is None else
                                   f"about {workdir.human_bytes(need)} needed", then)
    name = f": {err.filename}" if err.filename else ""
    return CompressError(f"cannot write {what} to {where} ({err.strerror}{name}); {then}")


@app.command(name="compress", help="Compress MODEL with a recipe and write a checkpoint directory.")
def compress_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="alias (smollm2-135m, llama-7b, ...), hub id, local dir or .gguf")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe name in recipes/ or a .yaml path")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output directory")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="recipe edit key.path=value (repeatable)")] = None,
    calib: Annotated[str | None, typer.Option("--calib", help="calibration data: pydoc|wikitext2|c4|ptb|file")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (one block on the GPU at a time)")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="load dtype: auto|float32|bfloat16|float16")] = "auto",
    save_dtype: Annotated[str, typer.Option(
        "--save-dtype", help="dtype of the dense parts on disk: auto (the source's own; bfloat16 for a GGUF) |"
                             " float32|bfloat16|float16")] = "auto",
    format_: Annotated[str | None, typer.Option(
        "--format", help="also write OUT-FORMAT for another runtime: compressed-tensors|gptq|gguf (checked before "
                         "any calibration; gguf-* recipes write gguf)")] = None,
    eval_windows: Annotated[int, typer.Option("--eval-windows", help="quick check windows (0: none)")] = 4,
    stream: Annotated[str, typer.Option("--stream", help="read the model block by block from its safetensors: auto "
                                                         "(when the whole model would not fit) | on | off")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="write OUT even if it holds a checkpoint of another recipe "
                                                        "or other files")] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    from compress import card, checkpoint, data, evaluate, lazy, models, parallel, workdir
    from compress import recipe as recipes
    from compress.pipeline import check_streamable, compress

    _check_count("--eval-windows", eval_windows, 0)
    _setup(verbose, threads)
    device = str(parallel.init(_check_device(device)))  # under torchrun / accelerate launch: this rank's device
    edits = list(set_ or []) + ([f"calibrate.dataset={calib}"] if calib else [])
    rec = recipes.load(recipe, edits)
    data.check_source(rec.calibrate.dataset)  # a missing --calib file is refused before the model loads
    _dtype(save_dtype)
    if format_ is None and "gguf" in rec.serves:  # a gguf-* recipe's result is the GGUF file
        format_ = "gguf"
    targets = list(dict.fromkeys([*([format_] if format_ else []), *rec.serves]))  # formats to satisfy
    if targets:
        from compress import export

        for f in targets:
            export.format_module(f)
    ref = models.resolve(model)
    streamed = lazy.should_stream(ref, _dtype(dtype), stream)
    if streamed:
        check_streamable(rec)
    out = out or _default_out(model, rec.name)
    # before the model loads: one run at a time per folder (held until the command ends; a folder this made and
    # left empty is removed), and never over another recipe's checkpoint or other files without --force
    ctx.with_resource(workdir.lock(out, " ".join(sys.argv)))
    workdir.check_target(out, rec.name, force)
    if format_:
        export.check_target(out.with_name(f"{out.name}-{format_}"), format_, force)
    console.print(f"[bold]compress[/] {escape(ref.display)} · recipe [cyan]{escape(rec.name)}[/]: "
                  f"{escape(rec.description)}" + (f" Edited: {escape(', '.join(edits))}." if edits else ""),
                  emoji=False)  # (the description is the recipe file's text: the edits say what differs from it)
    from compress.util import rss_mb

    before = rss_mb()
    with console.status(f"loading {escape(ref.display)}" + (" (block by block)" if streamed else "")):
        source = None
        if streamed:
            m, tok, source = lazy.open_lazy(ref, _dtype(dtype))
            console.print(f"reading the model block by block ({escape(lazy.describe(ref, _dtype(dtype)))}); the "
                          "quick check against the original is skipped", highlight=False)
        else:
            m, tok = models.load(ref, _dtype(dtype))
        keep = models.stored_dtype(ref) if save_dtype == "auto" else _dtype(save_dtype)  # the dense parts on disk
        _check_formats(m, rec, targets, format_, ref.display, keep)  # before any calibration or quick eval
        from compress import estimate
        from compress.pipeline import make_plan

        est = estimate.estimate(m, models.arch_of(m), make_plan(m, models.arch_of(m), rec), rec, streamed=streamed,
                                save_dtype=keep, baseline_mb=before)
        _check_memory(est, lazy.available_memory() + int(rss_mb() * 2**20), streamed)
        quick = None
        if eval_windows > 0 and not streamed:
            ev = data.evaluation(tok, "pydoc", rec.calibrate.seqlen, eval_windows, vocab_size=m.config.vocab_size)
            quick = evaluate.reference(m.to(device), ev.ids)
            m.to("cpu")
    # the work directory exists only once there is a model to work on (a failed load leaves nothing behind)
    with console.status("checking the work directory"):  # (rank 0 alone reads it: the others skip the digest)
        fp = workdir.fingerprint(ref, rec.to_dict(), dtype, device) if parallel.is_main() else {}
        work = workdir.WorkDir(out, fp)
    if work.finished:
        console.print(f"resuming: {work.finished} finished blocks found in {escape(str(work.dir))}")
    arch = models.arch_of(m)
    table = BlockTable(len(models.blocks_of(m, arch)))
    try:
        with Live(table.bar, console=console, refresh_per_second=4, transient=True):
            result = compress(m, tok, rec, device=device, progress=table, workdir=work,
                              say=lambda msg: console.print(escape(msg), highlight=False), source=source)
    except KeyboardInterrupt:
        console.print(f"\nfinished work ({work.finished} blocks, and any allocation state) is kept in "
                      f"{escape(str(work.dir))}; re-run the same command to resume")
        raise typer.Exit(130) from None  # (main says "interrupted")
    except Exception as e:  # a stage's state file on a full disk (the blocks say so themselves)
        err = workdir.write_error(e)
        if err is None or err.errno not in workdir.SPACE:
            raise
        raise workdir.space_error(err, work.dir, str(err.filename or "the work directory"), None,
                                  workdir.resume_hint(f"the finished work is kept in {work.dir}")) from None
    if not parallel.is_main():  # the other processes helped with the data-parallel stages; rank 0 writes
        return
    checked = uniform = None
    if quick is not None:
        with console.status("quick check against the original"):
            checked = evaluate.compare_to(quick, m.to(device), name=rec.name)
            if result.reference:  # the allocation's uniform reference, for its prediction's end-to-end check
                from compress.nn import swapped

                with swapped(m, result.reference):
                    uniform = evaluate.compare_to(quick, m.to(device), name="uniform")
            m.to("cpu")
    with console.status(f"writing {escape(str(out))}"):
        try:
            model_card = card.model_card(ref, result, quick, checked, uniform)
            if source is not None:
                checkpoint.save_streamed(m, tok, result.plan, rec, out, card=model_card, extra=card.summary(result),
                                         dtype=keep, blocks=arch.blocks, block_state=work.load_block,
                                         n_blocks=len(models.blocks_of(m, arch)))
            else:
                checkpoint.save(m, tok, result.plan, rec, out, card=model_card, extra=card.summary(result), dtype=keep)
        except Exception as e:  # .partial stays: the re-run resumes every block and only writes the checkpoint
            raise _write_failed(e, out, "the checkpoint", _bytes(m), workdir.resume_hint(
                f"every finished block is kept in {work.dir}")) from None
        work.remove()
    code, total = result.avg_bits()
    alloc = allocation_table(result.plan, result.shapes, arch.blocks)
    if alloc is not None:
        console.print(alloc)
    if alloc is not None and hasattr(rec.allocate.config, "target_bits"):
        target = rec.allocate.config.target_bits
        ratio = result.allocation.get("predicted_loss_ratio")
        console.print(f"allocation ({rec.allocate.method}): target {target:g} code bits → realised {code:.4f} "
                      f"code bits, {total:.4f} with scales/zeros"
                      + (f"; modelled layer-loss ratio vs uniform {ratio:.3f}" if ratio is not None else "")
                      + (f", measured KL ratio {checked.kl_mean / uniform.kl_mean:.3f} (quick check)"
                         if checked is not None and uniform is not None and uniform.kl_mean else ""))
    if format_ is not None:
        with console.status(f"writing {format_}"):
            try:
                exported = export.export(out, format_, out.with_name(f"{out.name}-{format_}"), force=force)
            except Exception as e:
                raise _write_failed(e, out.with_name(f"{out.name}-{format_}"), format_, None,
                                    f"the checkpoint {out} is complete: `compress export {out} --format {format_}` "
                                    "writes the export again") from None
        console.print(f"{format_}: {escape(str(exported))} ({_human_bytes(checkpoint.disk_bytes(exported))})",
                      highlight=False)
    size = checkpoint.disk_bytes(out)
    summary = (f"[green]done[/] in {result.seconds:.0f}s · peak RSS {result.peak_rss_mb:.0f} MB · "
               f"{code:.3f} bits/weight (codes), {total:.3f} with scales/zeros · {_human_bytes(size)} on disk")
    if checked is not None:
        summary += (f"\nquick check ({quick.stats.tokens} tokens of pydoc): ppl {quick.stats.ppl:.2f} → "
                    f"{checked.ppl:.2f}, KL {checked.kl_mean:.4f}, top-1 agreement {checked.top1:.1%}")
    console.print(summary)
    out_console.print(str(out), markup=False, highlight=False, emoji=False)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _check_memory(est: Any, available: int, streamed: bool) -> None:
    """Refuse a run whose estimated peak exceeds the memory this machine has, before it calibrates."""
    if est.peak <= available:
        return
    fix = ("fewer or shorter calibration windows (--set calibrate.samples=..., calibrate.seqlen=...), or a machine "
           "with more memory" if streamed else "--stream on (read the model block by block)")
    raise CompressError(f"this run needs about {_gb(est.peak)} of memory and {_gb(available)} is available; use "
                        f"{fix}; `compress plan` shows where the memory goes")


@app.command(name="plan", help="Show what a run would do and take (the plan, peak memory, disk, time) without "
                               "calibrating, and check the target formats.")
def plan_cmd(
    model: Annotated[str, typer.Argument(help="alias, hub id, local dir or .gguf")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe name in recipes/ or a .yaml path")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="recipe edit key.path=value (repeatable)")] = None,
    format_: Annotated[str | None, typer.Option("--format", help="check this export format too")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="load dtype: auto|float32|bfloat16|float16")] = "auto",
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="dense parts on disk")] = "auto",
    stream: Annotated[str, typer.Option("--stream", help="auto | on | off, as for `compress MODEL`")] = "auto",
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="time block 0 to estimate the run's time")]
    = True,
    threads: Annotated[int | None, typer.Option("--threads")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    from compress import estimate, lazy, models
    from compress import recipe as recipes
    from compress.pipeline import check_streamable, make_plan

    _setup(verbose, threads)
    rec = recipes.load(recipe, list(set_ or []))
    targets = list(dict.fromkeys([*([format_] if format_ else []), *rec.serves]))
    ref = models.resolve(model)
    streamed = lazy.should_stream(ref, _dtype(dtype), stream)
    if streamed:
        check_streamable(rec)
    source = None
    with console.status(f"reading {escape(ref.display)}"):
        if lazy.whole_model_bytes(ref) is not None:  # a local safetensors folder: shapes without the blocks' weights
            m, _, source = lazy.open_lazy(ref, _dtype(dtype))
        else:
            m, _ = models.load(ref, _dtype(dtype))
    arch = models.arch_of(m)
    base = make_plan(m, arch, rec)
    keep = models.stored_dtype(ref) if save_dtype == "auto" else _dtype(save_dtype)
    from compress.util import rss_mb

    baseline = rss_mb() - (sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]
                               if not t.is_meta) / 2**20)
    est = estimate.estimate(m, arch, base, rec, streamed=streamed, save_dtype=keep, baseline_mb=baseline)
    blocks = models.blocks_of(m, arch)
    t = Table("Linear (block 0 of " + str(len(blocks)) + ")", "shape", "code bits", "group", "packed", title=(
        f"plan: {escape(rec.name)} on {escape(ref.display)}"))
    for name in [n for n in base if n.startswith(f"{arch.blocks}.0.")]:
        spec, (N, K) = base[name], tuple(m.get_submodule(name).weight.shape)
        code, total = spec.bits_per_weight(N, K)
        t.add_row(name.removeprefix(f"{arch.blocks}.0."), f"{N} x {K}",
                  (f"{spec.ggml}: " if spec.ggml else "") + f"{code:.2f} ({total:.2f} with scales)",
                  str(spec.group_size), _human_bytes(estimate.packed_bytes(spec, N, K)))
    out_console.print(t)
    planned = {f"{n}.weight" for n in base}
    dense = sorted({k.rsplit(".", 1)[0] for k in m.state_dict() if k not in planned
                    and not k.startswith(f"{arch.blocks}.")})
    in_blocks = sorted({k.removeprefix(f"{arch.blocks}.").split(".", 1)[1].rsplit(".", 1)[0] for k in m.state_dict()
                        if k.startswith(f"{arch.blocks}.") and k not in planned
                        and not any(k.startswith(p + ".") for p in base)})
    code, total = base.avg_bits({n: tuple(m.get_submodule(n).weight.shape) for n in base})
    out_console.print(f"{len(base)} Linears packed at {code:.3f} code bits ({total:.3f} with scales/zeros); dense: "
                      f"{', '.join(dense)}; in every block: {', '.join(in_blocks) or '-'}", highlight=False,
                      markup=False, soft_wrap=True)
    mode = "block by block (--stream on)" if streamed else "whole model in memory"
    lines = [f"run: {mode}",
             f"estimated peak RAM: {_gb(est.peak)} ("
             + ", ".join(f"{k} {_gb(v)}" for k, v in est.parts.items() if v) + ")",
             f"estimated peak GPU memory with --device cuda: {_gb(est.gpu or 0)} (one block at a time)",
             f"disk: checkpoint {_gb(est.output)}, work directory up to {_gb(est.work)} while it runs"]
    available = lazy.available_memory() + int(rss_mb() * 2**20)  # what a run in a fresh process can have
    lines.append(f"memory available: {_gb(available)}: " + ("fits" if est.peak <= available else "does NOT fit"))
    if probe:
        with console.status("timing block 0"):
            secs = estimate.seconds(m, arch, base, rec, source)
        lines.append(f"estimated rounding time: {secs / 60:.1f} min on this machine ({torch_threads()} threads; "
                     "measured on block 0 with random tokens; load and save not included)")
    for line in lines:
        out_console.print(line, highlight=False, markup=False, soft_wrap=True)
    for f in targets:
        from compress import export

        shapes = {n: tuple(m.get_submodule(n).weight.shape) for n in base}
        try:
            export.check(f, base, shapes, rec, keep, m.config)
            out_console.print(f"{f}: the plan exports", highlight=False, markup=False, soft_wrap=True)
        except CompressError as e:
            if f == format_:
                raise
            out_console.print(f"{f} (the recipe serves it): {e}", highlight=False, markup=False, soft_wrap=True)
    _check_memory(est, available, streamed)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@eval_app.command(help="Compare ORIGINAL with one or more COMPRESSED checkpoints on identical inputs.")
def eval_cmd(
    original: Annotated[str, typer.Argument(help="the original: alias, hub id, local dir or .gguf")],
    compressed: Annotated[list[Path], typer.Argument(help="checkpoint directories written by `compress`")],
    suite_name: Annotated[str, typer.Option("--suite", help="quick | standard (+ offline MC) | full (+ hub ppl)")]
    = "quick",
    dataset: Annotated[str, typer.Option("--dataset", help="perplexity text: pydoc|wikitext2|c4|ptb|file")] = "pydoc",
    seqlen: Annotated[int, typer.Option("--seqlen")] = 512,
    windows: Annotated[int, typer.Option("--windows", help="windows from the start of the text (0: all)")] = 40,
    baseline: Annotated[list[str] | None, typer.Option("--baseline", help="also score the original compressed "
                                                       "in memory with this recipe (e.g. rtn-4bit); repeatable")]
    = None,
    bnb: Annotated[list[str] | None, typer.Option("--bnb", help="also score the original loaded through "
                                                  "bitsandbytes: nf4 | fp4 | int8; repeatable")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="report folder (default: the first checkpoint)")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="reuse results per (model, task)")] = True,
    digests: Annotated[bool, typer.Option("--verify/--no-verify", help="compare each checkpoint's tensors with "
                                          "its checksums.json before loading it")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the JSON here")] = None,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    threads: Annotated[int | None, typer.Option("--threads")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    import os

    from compress import baselines, checkpoint, data, evaluate, models, suite
    from compress import recipe as recipes
    from compress.pipeline import compress as run_recipe

    _check_count("--seqlen", seqlen, 1)
    _check_count("--windows", windows, 0)
    _setup(verbose, threads)
    data.check_source(dataset)  # a missing --dataset file is refused before any model loads
    device = _check_device(device)
    bnb = [baselines.check_kind(k) for k in bnb or []]
    bnb_version = baselines.version() if bnb else None  # missing or too old: fail before loading anything
    ref = models.resolve(original)
    if suite_name not in suite.SUITES:
        raise CompressError(f"unknown suite {suite_name!r}; choose one of {', '.join(suite.SUITES)}")
    ppl = suite.Perplexity(dataset, seqlen, windows or None)
    tasks_ = (ppl, *[t for t in suite.SUITES[suite_name] if not (isinstance(t, suite.Perplexity) and
                                                                 t.dataset == dataset)])
    for c in compressed:
        if not (c / "config.json").is_file():
            raise CompressError(f"{c} is not a checkpoint directory (no config.json)")
    base = Path(ref.source)
    ref_files = [base / ref.gguf_file] if ref.gguf_file else sorted(base.glob("*.safetensors")) if base.is_dir() else []
    with console.status("loading the original's tokenizer"):
        orig_model, tok = models.load(ref)
    for c in compressed:
        _check_vocabulary(c, orig_model.config, tok, ref.display)
    entries = [suite.Entry(ref.display, suite.fingerprint(*([] if ref_files else [ref.source]), files=ref_files),
                           lambda: orig_model.to(device), {"disk_bytes": models.disk_bytes(ref)})]
    for c in compressed:
        files = [*sorted(c.glob("*.safetensors")), c / "config.json"]

        def load(c: Path = c) -> Any:
            return checkpoint.load(c, device=device, verify_digests=digests)

        m_bits = json.loads((c / "config.json").read_text()).get("quantization_config", {})
        entries.append(suite.Entry(c.name, suite.fingerprint("checkpoint", files=files), load,
                                   {"bits": (m_bits.get("avg_bits_code"), m_bits.get("avg_bits_total")),
                                    "disk_bytes": checkpoint.disk_bytes(c)}))
    in_memory: list[suite.Entry] = []
    for name in baseline or []:
        rec = recipes.load(name)

        def make(rec: Any = rec) -> Any:
            m, _ = models.load(ref)
            run_recipe(m, tok, rec, device=device)
            return m.to(device)

        entries.append(suite.Entry(f"{name} (in memory)", suite.fingerprint(entries[0].fingerprint, rec.to_dict()),
                                   make, {"bits": None}))
        in_memory.append(entries[-1])
    for kind in dict.fromkeys(bnb):

        def make_bnb(kind: str = kind) -> Any:
            m, _ = models.load(ref)
            return baselines.bnb(m.to(device), kind)

        fp = suite.fingerprint(entries[0].fingerprint, "bitsandbytes", bnb_version, baselines.settings(kind),
                               device.split(":")[0])  # CPU and CUDA kernels differ
        entries.append(suite.Entry(f"bnb {kind} (in memory)", fp, make_bnb, {"bits": baselines.bits(orig_model, kind)}))
    root = Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress")) / "eval"
    store = suite.Cache(root if cache else None)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=console)
    with bar:
        ids: dict[str, Any] = {}

        def progress(key: str, i: int, n: int) -> None:
            if key not in ids:
                ids[key] = bar.add_task(key, total=n)
            bar.update(ids[key], completed=i)

        report = suite.run(tasks_, entries, tok, store, progress, name=suite_name)
    for e in in_memory:  # in-memory recipe baselines: bits are known once built (then cached)
        if e._model is not None:
            e.facts["bits"] = evaluate.bits(e._model)
            store.put(e.fingerprint, "facts", {"bits": e.facts["bits"]})
        else:
            e.facts["bits"] = (store.get(e.fingerprint, "facts") or {}).get("bits")
    md = suite.markdown(report)
    out_console.print(_report_table(report))
    folder = out or compressed[0]
    stem = f"eval-{suite_name}-{Path(dataset).name}-{seqlen}x{windows or 'all'}"
    payload = report.to_dict() | {"protocol": "token-level ppl, consecutive non-overlapping windows, each scored on "
                                              "its own (the GPTQ protocol), not lm-eval's word perplexity"}
    (folder / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    if json_out is not None:
        json_out.write_text(json.dumps(payload, indent=1))
    (folder / f"{stem}.md").write_text(f"# compress eval · suite {suite_name}\n\n{md}\n")
    png = suite.plot(report, folder / f"{stem}.png")
    console.print(f"wrote {escape(str(folder / stem))}.json, .md"
                  + (", .png" if png else " (no plot: pip install matplotlib)"))


VOCAB_PROBES = ("The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x ** 2  # 1234567890",
                "Ünïcödé, 数字 and emoji 🙂 — “quotes”")


def _check_vocabulary(ckpt: Path, config: Any, tok: Any, original: str) -> None:
    """Refuse a checkpoint whose vocabulary is not the original's: eval feeds both models the original's token
    ids, so a checkpoint of another model family would be scored on nonsense (a huge KL, no error). Compares
    config.json's vocab_size, then the checkpoint's saved tokenizer (its size and a few encodings), if any."""
    from transformers import AutoTokenizer

    try:
        cfg = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CompressError(f"{ckpt}/config.json cannot be read as JSON ({e}); re-run compress to rewrite the "
                            "checkpoint") from None
    theirs = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size")) if isinstance(cfg, dict) else None
    ours = getattr(config, "vocab_size", None)
    if theirs is not None and ours is not None and theirs != ours:
        raise CompressError(f"checkpoint {ckpt} has vocab_size {theirs} but the original {original} has {ours}: it "
                            "was compressed from another model; pass that model as ORIGINAL")
    if not any((ckpt / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return  # no tokenizer saved: the config check is all there is
    try:
        saved = AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a broken tokenizer folder
        raise CompressError(f"the tokenizer saved in {ckpt} cannot be loaded ({type(e).__name__}); re-run compress "
                            "to rewrite the checkpoint") from None
    if len(saved) != len(tok):
        raise CompressError(f"checkpoint {ckpt}'s tokenizer has {len(saved)} tokens but the original {original}'s "
                            f"has {len(tok)}: it was compressed from another model; pass that model as ORIGINAL")
    for text in VOCAB_PROBES:
        if saved(text).input_ids != tok(text).input_ids:
            raise CompressError(f"checkpoint {ckpt}'s tokenizer encodes {text!r} differently from the original "
                                f"{original}'s: it was compressed from another model; pass that model as ORIGINAL")


def _report_table(report: Any) -> Table:
    t = Table(title=f"suite {report.suite}: token-level perplexity (GPTQ protocol), KL(original‖model), top-1 "
                    "agreement, offline multiple choice")
    t.add_column("metric")
    for e in report.entries:
        t.add_column(escape(e.name), justify="right")

    def fmt(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    rows: list[tuple[str, list[str]]] = []
    for key, rs in report.results.items():
        if key.startswith("ppl"):
            rows += [(f"{key}: perplexity", [fmt((r or {}).get("ppl"), ".3f") for r in rs]),
                     ("KL(original‖model) / token", [fmt((r or {}).get("kl_mean"), ".4f") for r in rs]),
                     ("max KL of a token", [fmt((r or {}).get("kl_max"), ".2f") for r in rs]),
                     ("top-1 agreement", [fmt((r or {}).get("top1"), ".2%") for r in rs]),
                     ("forward tokens/s", [fmt((r or {}).get("tokens_per_s"), ".0f") for r in rs]),
                     ("weights in memory", [_human_bytes((r or {}).get("memory_bytes")) for r in rs])]
        elif key.startswith("mc"):
            rows.append((f"{key}: accuracy", [f"{r['accuracy']:.1%} ± {r['stderr']:.1%}" if r else "-" for r in rs]))
        else:  # lm-eval: one row per task metric (acc, acc_norm, word_perplexity, ...)
            names = sorted({k for r in rs if r for k in r if not k.endswith("_stderr")})
            for n in names:
                rows.append((f"lm-eval {n}", [fmt((r or {}).get(n), ".4g") + (
                    f" ± {r[n + '_stderr']:.2g}" if r and f"{n}_stderr" in r else "") for r in rs]))
    rows.append(("bits/weight (codes / +scales)", [
        "-" if not (e.facts.get("bits") or [None])[0] else f"{e.facts['bits'][0]:.3f} / {e.facts['bits'][1]:.3f}"
        for e in report.entries]))
    rows.append(("bytes on disk", [_human_bytes(e.facts.get("disk_bytes")) for e in report.entries]))
    for label, cells in rows:
        t.add_row(label, *cells)
    for key, why in report.skipped.items():
        t.caption = (t.caption or "") + f"skipped {key}: {why}  "
    return t


@app.command(name="export", help="Write a compress CHECKPOINT in another runtime's format (or, with --format gguf, "
                                 "an uncompressed MODEL as a dense GGUF).")
def export_cmd(
    path: Annotated[Path, typer.Argument(help="a checkpoint directory written by `compress` (gguf: or a model)")],
    format_: Annotated[str, typer.Option("--format", help="compressed-tensors | gptq | gguf")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output directory (default: CHECKPOINT-FORMAT)")]
    = None,
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="dense parts: auto (the checkpoint's) | float32 | "
                                                                  "bfloat16 | float16")] = "auto",
    digests: Annotated[bool, typer.Option("--verify/--no-verify", help="compare the checkpoint's tensors with its "
                                          "checksums.json first")] = True,
    force: Annotated[bool, typer.Option("--force", help="write into OUT even if it holds other files")] = False,
) -> None:
    from compress import checkpoint, export

    export.format_module(format_)
    dtype = None if save_dtype == "auto" else _dtype(save_dtype)
    out = out or path.with_name(f"{path.name.removesuffix('.gguf')}-{format_}")
    if format_ == "gguf" and not checkpoint.is_checkpoint(path):  # a model, not ours: its dense GGUF
        from compress import models
        from compress.export import gguf

        export.check_target(out, format_, force)
        with console.status(f"loading {escape(str(path))}"):
            m, tok = models.load(models.resolve(str(path)), torch.float32)
        with console.status(f"writing a dense gguf to {escape(str(out))}"):
            gguf.write_dense(m, tok, out, dtype=dtype or torch.bfloat16)
        console.print(f"[green]done[/] · dense gguf · {_human_bytes(checkpoint.disk_bytes(out))} on disk",
                      highlight=False)
        out_console.print(str(out), markup=False, highlight=False, emoji=False)
        return
    with console.status(f"writing {format_} to {escape(str(out))}"):
        export.export(path, format_, out, dtype=dtype, verify_digests=digests, force=force)
    console.print(f"[green]done[/] · {format_} · {_human_bytes(checkpoint.disk_bytes(out))} on disk", highlight=False)
    out_console.print(str(out), markup=False, highlight=False, emoji=False)


RUNTIMES = {  # quant_method of an exported folder -> who loads it
    "compressed-tensors": "vLLM, SGLang, transformers + compressed-tensors",
    "gptq": "vLLM (gptq/gptq_marlin), SGLang, TGI, transformers + optimum + gptqmodel",
    "gguf": "llama.cpp, llama-cpp-python, ollama, LM Studio",
}


@app.command(name="verify", help="Check a checkpoint folder (every tensor against the plan and its checksum, finite "
                                 "scales) without loading the model, and say which runtimes can load it.")
def verify_cmd(
    path: Annotated[Path, typer.Argument(help="a checkpoint directory written by `compress`")],
    digests: Annotated[bool, typer.Option("--verify/--no-verify", help="compare checksums (tensor data)")] = True,
) -> None:
    from compress import checkpoint, export

    with console.status(f"checking {escape(str(path))}"):
        found = checkpoint.inspect(path, digests=digests)
    title = (f"{escape(str(path))}: {found.tensors} tensors, {_human_bytes(found.bytes)}, "
             f"recipe {escape(found.recipe or '-')}")
    t = Table("runtime", "loads it", "how", title=title)
    t.add_row("compress", "yes", "compress.load(DIR), or from_pretrained(DIR) after `import compress`")
    for name in export.FORMATS:
        try:
            export.check(name, found.plan, found.shapes, config=found.config)
            t.add_row(name, "after export", f"compress export DIR --format {name} → {RUNTIMES[name]}")
        except CompressError as e:
            t.add_row(name, "no", escape(str(e).removeprefix(f"{name} cannot hold this plan: ")))
    out_console.print(t)
    checked = "every tensor matches checksums.json" if found.checksums else (
        "checksums not compared (--no-verify)" if not digests else "no checksums.json: tensor data not verified")
    console.print(f"[green]ok[/] · {len(found.plan)} packed Linears match the plan · {checked} · scales finite",
                  highlight=False)


@app.command(name="recipes", help="List the named recipes.")
def recipes_cmd() -> None:
    from compress import recipe as recipes

    t = Table("name", "serves as", "description")
    for name in recipes.available():
        r = recipes.load(name)
        t.add_row(name, ", ".join(r.serves) or "-", r.description)
    out_console.print(t)


def main(argv: list[str] | None = None) -> None:
    """Entry point: `compress eval ...`, `compress recipes`, or `compress MODEL --recipe ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv[:1] = ["--help"] if argv[:1] == ["-h"] else argv[:1]  # the group knows only --help
    if argv and argv[0] == "eval":
        target, args = eval_app, argv[1:]
    elif argv and argv[0] in ("recipes", "compress", "export", "verify", "plan"):
        target, args = app, argv
    else:
        target, args = app, ["compress", *argv] if argv and argv[0] not in ("--help", "-h") else argv
    interrupt.handled_by_main()  # Ctrl-C is a KeyboardInterrupt from here on, caught below (compress/interrupt.py)
    try:
        code = target(args=args, prog_name="compress eval" if target is eval_app else "compress",
                      standalone_mode=False)  # non-standalone click returns typer.Exit codes instead of exiting
        if code == 130:  # typer turns a KeyboardInterrupt inside a command into this code, silently
            console.print("[yellow]interrupted[/]")
        if isinstance(code, int) and code:
            sys.exit(code)
    except CompressError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        usage = _usage_error(e)
        if usage is None:
            raise
        _fail(f"{usage}; see `{getattr(getattr(e, 'ctx', None), 'command_path', None) or 'compress'} --help`"
              + _subcommand_hint(argv if target is app and args[:1] == ["compress"] else []))


def _fail(message: str) -> NoReturn:
    """Print the one `error: ...` line and exit 2. The message is user text, so it goes in as a rich Text, never
    parsed for markup or emoji codes (a model named `[/]` would otherwise crash rich), its line breaks joined."""
    from rich.text import Text

    line = Text.assemble(("error:", "red"), " ", " ".join(message.splitlines()))
    console.print(line, highlight=False, soft_wrap=True)  # one line, never wrapped
    sys.exit(2)


def _usage_error(e: Exception) -> str | None:
    """The one-line message of a click usage error (missing option, unknown option, bad value, extra argument),
    or None for any other exception. Typer 0.29 raises its vendored click's classes (typer._click), older typers
    the installed click's: both are recognised by class name and interface, not by one import."""
    names = {cls.__name__ for cls in type(e).__mro__}
    if "ClickException" not in names or not callable(getattr(e, "format_message", None)) or \
            not hasattr(e, "exit_code"):
        return None
    return " ".join(str(e.format_message()).split()).rstrip(".")


def _subcommand_hint(argv: list[str]) -> str:
    """' (is 'evl' a mistyped `compress eval`?)' when the word taken as MODEL looks like a mistyped subcommand
    (`compress evl A B` otherwise only says that --recipe is missing)."""
    import difflib

    try:
        if not argv or Path(argv[0]).exists():
            return ""
    except (OSError, ValueError):  # a name too long for the file system, or one with a NUL byte
        return ""
    close = difflib.get_close_matches(argv[0], ["eval", "export", "recipes", "compress", "verify"], n=1, cutoff=0.6)
    return f" (is {argv[0]!r} a mistyped `compress {close[0]}`?)" if close else ""


if __name__ == "__main__":
    main()
