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
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from compress.errors import CompressError

if TYPE_CHECKING:
    from compress.evaluate import ModelStats
    from compress.plan import Plan
    from compress.sequential import BlockReport

console = Console(stderr=True)
out_console = Console()

USAGE = """Make a language model small and compare it with the original.

  compress MODEL --recipe NAME [--out DIR] [--set key=value ...] [--calib DATASET] [--device cpu|cuda]

  compress eval ORIGINAL COMPRESSED [--dataset pydoc] [--seqlen 512] [--windows 40]

  compress recipes

Run `compress compress --help` or `compress eval --help` for every option."""

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=USAGE)
eval_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _setup(verbose: bool, threads: int | None) -> None:
    import os

    import torch

    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' own bars (GGUF conversion, shard writing)

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])
    if threads:
        torch.set_num_threads(threads)


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
        raise CompressError(f"--dtype {name!r} is invalid; choose one of {', '.join(table)}")
    return table[name]


def _default_out(model: str, recipe_name: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name.removesuffix(".gguf")).strip("-").lower()
    return Path("out") / f"{stem}-{recipe_name}"


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

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console)
        self.task = self.bar.add_task("blocks", total=total)
        self.stage, self.done_fresh, self.seconds = None, 0, 0.0

    def _table(self, header: bool) -> Table:
        t = Table(show_header=header, box=None, pad_edge=False)
        for name, width, just in self.COLUMNS:
            t.add_column(name, width=width, justify=just, no_wrap=True)
        return t

    def __call__(self, rep: BlockReport) -> None:
        if rep.stage != self.stage:  # a new pass: its own heading, bar and ETA
            self.stage, self.done_fresh, self.seconds = rep.stage, 0, 0.0
            self.bar.update(self.task, description=rep.stage, completed=0, total=rep.total)
            console.print(f"[bold]{rep.stage}[/]")
            console.print(self._table(header=True))
        self.bar.update(self.task, completed=rep.index + 1)
        row = self._table(header=False)
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
                f"{damp:g}" if damp else "-", f"{rep.seconds:.1f}", f"{eta:.0f}s")
        console.print(row)


def allocation_table(plan: Plan, shapes: dict[str, tuple[int, int]], prefix: str) -> Table | None:
    """Blocks x Linear kinds; a cell is the Linear's width, or one digit per group along K when widths mix."""
    kinds: list[str] = []
    cells: dict[str, dict[str, str]] = {}
    for name, spec in plan.layers.items():
        block, _, kind = name.removeprefix(prefix + ".").partition(".")
        kinds += [kind] if kind not in kinds else []
        gb = spec.group_bits(shapes[name][1])
        cells.setdefault(block, {})[kind] = str(gb[0]) if len(set(gb)) == 1 else "".join(map(str, gb))
    if all(isinstance(s.bits, int) for s in plan.layers.values()) and len({s.bits for s in plan.layers.values()}) == 1:
        return None  # uniform: nothing to show
    t = Table("block", *[k.split(".")[-1] for k in kinds], title="allocation (code bits per Linear or per group)")
    for block, row in cells.items():
        t.add_row(block, *[row.get(k, "-") for k in kinds])
    return t


@app.command(name="compress", help="Compress MODEL with a recipe and write a checkpoint directory.")
def compress_cmd(
    model: Annotated[str, typer.Argument(help="alias (smollm2-135m, llama-7b, ...), hub id, local dir or .gguf")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe name in recipes/ or a .yaml path")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output directory")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="recipe edit key.path=value (repeatable)")] = None,
    calib: Annotated[str | None, typer.Option("--calib", help="calibration data: pydoc|wikitext2|c4|ptb|file")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (one block on the GPU at a time)")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="load dtype: auto|float32|bfloat16|float16")] = "auto",
    eval_windows: Annotated[int, typer.Option("--eval-windows", help="quick check windows (0: none)")] = 4,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    from compress import card, checkpoint, data, evaluate, models
    from compress import recipe as recipes
    from compress.pipeline import compress

    _setup(verbose, threads)
    device = _check_device(device)
    edits = list(set_ or []) + ([f"calibrate.dataset={calib}"] if calib else [])
    rec = recipes.load(recipe, edits)
    ref = models.resolve(model)
    out = out or _default_out(model, rec.name)
    console.print(f"[bold]compress[/] {ref.display} · recipe [cyan]{rec.name}[/]: {rec.description}")
    with console.status(f"loading {ref.display}"):
        m, tok = models.load(ref, _dtype(dtype))
        quick = None
        if eval_windows > 0:
            ev = data.evaluation(tok, "pydoc", rec.calibrate.seqlen, eval_windows, vocab_size=m.config.vocab_size)
            quick = evaluate.reference(m.to(device), ev.ids)
            m.to("cpu")
    # the work directory exists only once there is a model to work on (a failed load leaves nothing behind)
    work = checkpoint.WorkDir(out, {"model": ref.source, "gguf": ref.gguf_file, "recipe": rec.to_dict(),
                                    "dtype": dtype})
    if work.finished:
        console.print(f"resuming: {work.finished} finished blocks found in {work.dir}")
    arch = models.arch_of(m)
    table = BlockTable(len(models.blocks_of(m, arch)))
    try:
        with Live(table.bar, console=console, refresh_per_second=4, transient=True):
            result = compress(m, tok, rec, device=device, progress=table, workdir=work,
                              say=lambda msg: console.print(msg, highlight=False))
    except KeyboardInterrupt:
        console.print(f"\n[yellow]interrupted[/]: finished work ({work.finished} blocks, and any allocation state) "
                      f"is kept in {work.dir}; re-run the same command to resume")
        raise typer.Exit(130) from None
    checked = None
    if quick is not None:
        with console.status("quick check against the original"):
            checked = evaluate.compare_to(quick, m.to(device), name=rec.name)
            m.to("cpu")
    with console.status(f"writing {out}"):
        checkpoint.save(m, tok, result.plan, rec, out, card=card.model_card(ref, result, quick, checked),
                        extra=card.summary(result))
        work.remove()
    code, total = result.avg_bits()
    alloc = allocation_table(result.plan, result.shapes, arch.blocks)
    if alloc is not None:
        console.print(alloc)
        target = rec.allocate.config.target_bits
        ratio = result.allocation.get("predicted_loss_ratio")
        console.print(f"allocation ({rec.allocate.method}): target {target:g} code bits → realised {code:.4f} "
                      f"code bits, {total:.4f} with scales/zeros"
                      + (f"; modelled layer-loss ratio vs uniform {ratio:.3f}" if ratio is not None else ""))
    size = checkpoint.disk_bytes(out)
    summary = (f"[green]done[/] in {result.seconds:.0f}s · peak RSS {result.peak_rss_mb:.0f} MB · "
               f"{code:.3f} bits/weight (codes), {total:.3f} with scales/zeros · {_human_bytes(size)} on disk")
    if checked is not None:
        summary += (f"\nquick check ({quick.stats.tokens} tokens of pydoc): ppl {quick.stats.ppl:.2f} → "
                    f"{checked.ppl:.2f}, KL {checked.kl_mean:.4f}, top-1 agreement {checked.top1:.1%}")
    console.print(summary)
    out_console.print(str(out))


def _stats_table(stats: list[ModelStats], title: str) -> Table:
    t = Table(title=title)
    t.add_column("metric")
    for s in stats:
        t.add_column(s.name, justify="right")
    rows = [
        ("perplexity", lambda s: f"{s.ppl:.3f}"),
        ("KL(original‖model) / token", lambda s: "-" if s.kl_mean is None else f"{s.kl_mean:.4f}"),
        ("max KL of a token", lambda s: "-" if s.kl_max is None else f"{s.kl_max:.2f}"),
        ("top-1 agreement", lambda s: "-" if s.top1 is None else f"{s.top1:.2%}"),
        ("bits/weight (codes)", lambda s: "-" if s.bits_code is None else f"{s.bits_code:.3f}"),
        ("bits/weight (+scales/zeros)", lambda s: "-" if s.bits_total is None else f"{s.bits_total:.3f}"),
        ("bytes on disk", lambda s: _human_bytes(s.disk_bytes)),
        ("forward seconds", lambda s: f"{s.seconds:.1f}"),
    ]
    for label, fn in rows:
        t.add_row(label, *[fn(s) for s in stats])
    return t


@eval_app.command(help="Compare ORIGINAL and COMPRESSED side by side on identical windows.")
def eval_cmd(
    original: Annotated[str, typer.Argument(help="the original: alias, hub id, local dir or .gguf")],
    compressed: Annotated[Path, typer.Argument(help="a checkpoint directory written by `compress`")],
    dataset: Annotated[str, typer.Option("--dataset", help="pydoc|wikitext2|c4|ptb|text file")] = "pydoc",
    seqlen: Annotated[int, typer.Option("--seqlen")] = 512,
    windows: Annotated[int, typer.Option("--windows", help="windows from the start of the text (0: all)")] = 40,
    json_out: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    threads: Annotated[int | None, typer.Option("--threads")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    from compress import checkpoint, data, evaluate, models

    _setup(verbose, threads)
    device = _check_device(device)
    ref = models.resolve(original)
    with console.status("loading models"):
        orig, tok = models.load(ref)
        comp = checkpoint.load(compressed, device=device)
        orig.to(device)
    ev = data.evaluation(tok, dataset, seqlen, windows or None, vocab_size=orig.config.vocab_size)
    bar = Progress(TextColumn("windows"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=console)
    with bar:
        task = bar.add_task("eval", total=len(ev))
        stats = evaluate.compare({ref.display: orig, compressed.name: comp}, ev.ids,
                                 progress=lambda i, n: bar.update(task, completed=i))
    stats[0].disk_bytes = models.disk_bytes(ref)
    stats[1].disk_bytes = checkpoint.disk_bytes(compressed)
    out_console.print(_stats_table(stats, f"{ev.describe()} · token-level perplexity (GPTQ protocol)"))
    path = json_out or compressed / f"eval-{Path(dataset).name}-{seqlen}x{len(ev)}.json"
    payload = {"dataset": dataset, "windows": len(ev), "seqlen": seqlen, "source": ev.source,
               "protocol": "token-level ppl, consecutive non-overlapping windows, each scored on its own",
               "models": [s.to_dict() for s in stats]}
    path.write_text(json.dumps(payload, indent=1))
    console.print(f"wrote {path}")


@app.command(name="recipes", help="List the named recipes.")
def recipes_cmd() -> None:
    from compress import recipe as recipes

    t = Table("name", "description")
    for name in recipes.available():
        t.add_row(name, recipes.load(name).description)
    out_console.print(t)


def main(argv: list[str] | None = None) -> None:
    """Entry point: `compress eval ...`, `compress recipes`, or `compress MODEL --recipe ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":
        target, args = eval_app, argv[1:]
    elif argv and argv[0] in ("recipes", "compress"):
        target, args = app, argv
    else:
        target, args = app, ["compress", *argv] if argv and argv[0] not in ("--help", "-h") else argv
    try:
        code = target(args=args, prog_name="compress eval" if target is eval_app else "compress",
                      standalone_mode=False)  # non-standalone click returns typer.Exit codes instead of exiting
        if isinstance(code, int) and code:
            sys.exit(code)
    except CompressError as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)  # one line, never wrapped
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
