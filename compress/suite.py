"""Eval suites: the original and any number of compressed models on identical inputs, cached per
(model fingerprint, task).

A suite is a literal tuple of tasks. Each task scores every model and returns one dict of metrics per
model; the first model is the original (the reference for KL and top-1 agreement):

    Perplexity(dataset, seqlen, windows)   token-level ppl over consecutive windows (the GPTQ protocol),
                                           KL(original ‖ model) mean and max, top-1 agreement, tokens/s,
                                           and the model's weights in memory (parameters + buffers, tied
                                           tensors once: models are scored side by side in one process, so
                                           a per-model peak RSS is not separable; the compress run and
                                           evals/decode.py report peak RSS)
    MultipleChoice(n, ...)                 the offline pydoc continuation task (compress.tasks), acc ± stderr

Results are cached as JSON under `cache_dir/<fingerprint>/<task key>.json`; a model whose every task is
cached is never loaded. A task whose data is not available here (a hub dataset while offline) is reported
as skipped with the reason, never silently dropped; a model that fails to load is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from compress import data, digest, evaluate, tasks
from compress.errors import CompressError
from compress.util import atomic_write

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One model of the comparison: loaded only when some task is not cached."""

    name: str
    fingerprint: str
    load: Callable[[], nn.Module]
    facts: dict[str, Any] = field(default_factory=dict)  # bits, bytes on disk, ... (shown as columns)
    _model: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = self.load()
        return self._model


def memory_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied embeddings)."""
    storages = {(st := t.untyped_storage()).data_ptr(): st.nbytes() for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


@dataclass(frozen=True)
class Perplexity:
    dataset: str = "pydoc"
    seqlen: int = 512
    windows: int | None = 40

    @property
    def key(self) -> str:
        return f"ppl-{Path(self.dataset).name}-{self.seqlen}x{self.windows or 'all'}"

    def prepare(self, tokenizer: Any) -> data.Windows:
        return data.evaluation(tokenizer, self.dataset, self.seqlen, self.windows)

    def score(self, entries: list[Entry], ev: data.Windows, progress: Callable[[str, int, int], None]) -> list[dict]:
        stats = evaluate.compare({e.name: e.model for e in entries}, ev.ids,
                                 progress=lambda i, n: progress(self.key, i, n))
        out = []
        for e, s in zip(entries, stats, strict=True):
            out.append({"memory_bytes": memory_bytes(e.model),
                        "ppl": s.ppl, "kl_mean": s.kl_mean, "kl_max": s.kl_max, "top1": s.top1, "tokens": s.tokens,
                        "tokens_per_s": s.tokens / s.seconds if s.seconds else None, "source": ev.source,
                        "worst_windows": sorted(range(len(s.window_nll)), key=lambda i: -s.window_nll[i])[:3]})
        return out


@dataclass(frozen=True)
class MultipleChoice:
    n: int = 400
    context: int = 64
    continuation: int = 12
    choices: int = 4
    seed: int = 0

    @property
    def key(self) -> str:
        return f"mc-pydoc-{self.n}-{self.context}-{self.continuation}-{self.choices}-{self.seed}"

    def prepare(self, tokenizer: Any) -> list[tasks.Item]:
        return tasks.pydoc_mc(tokenizer, self.n, self.context, self.continuation, self.choices, self.seed)

    def score(self, entries: list[Entry], items: list[tasks.Item],
              progress: Callable[[str, int, int], None]) -> list[dict]:
        out = []
        for e in entries:
            r = tasks.score(e.model, items, lambda i, n, name=e.name: progress(f"{self.key} {name}", i, n))
            out.append(r.to_dict())
        return out


@dataclass(frozen=True)
class LmEval:
    """lm-evaluation-harness tasks on our loaded models (zero-shot accuracy with its standard error, and
    lm-eval's *word* perplexity for wikitext, labelled so: not the GPTQ token perplexity above).
    `include_path` adds local task YAMLs (e.g. a task on a local JSON file, for machines with no network)."""

    tasks: tuple[str, ...] = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "lambada_openai")
    limit: int | None = None
    include_path: str | None = None
    batch_size: int = 8

    @property
    def key(self) -> str:
        return f"lmeval-{'+'.join(self.tasks)}-{self.limit or 'all'}"

    def prepare(self, tokenizer: Any) -> Any:
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise CompressError("lm-eval is not installed (pip install lm-eval)") from None
        manager = TaskManager(include_path=self.include_path)
        try:  # building the tasks downloads their data: offline without a cache, this is where it fails
            manager.load(list(self.tasks))
        except Exception as e:
            raise CompressError(f"lm-eval tasks {', '.join(self.tasks)} are not available here "
                                f"({type(e).__name__}: {str(e)[:120]})") from e
        return (manager, tokenizer)

    def score(self, entries: list[Entry], prepared: Any, progress: Callable[[str, int, int], None]) -> list[dict]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        manager, tokenizer = prepared
        out = []
        for i, e in enumerate(entries):
            device = str(next(e.model.parameters()).device)
            lm = HFLM(pretrained=e.model, tokenizer=tokenizer, batch_size=self.batch_size, device=device)
            res = lm_eval.simple_evaluate(model=lm, tasks=list(self.tasks), limit=self.limit, task_manager=manager,
                                          log_samples=False, verbosity="ERROR")
            row = {}
            for task, metrics in (res or {}).get("results", {}).items():
                for name, value in metrics.items():
                    if isinstance(value, int | float) and not name.startswith("alias"):
                        row[f"{task}/{name.split(',')[0]}"] = float(value)
            out.append(row)
            progress(self.key, i + 1, len(entries))
        return out


Task = Perplexity | MultipleChoice | LmEval
SUITES: dict[str, tuple[Task, ...]] = {
    "quick": (Perplexity("pydoc", 512, 40),),
    "standard": (Perplexity("pydoc", 512, 40), MultipleChoice()),
    "full": (Perplexity("pydoc", 512, 40), MultipleChoice(), Perplexity("wikitext2", 2048, None),
             Perplexity("c4", 2048, 256), LmEval()),
}


class Cache:
    """JSON results per (fingerprint, task key); `None` directory = no caching."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _path(self, fp: str, key: str) -> Path:
        assert self.root is not None
        return self.root / fp / f"{key}.json"

    def get(self, fp: str, key: str) -> dict | None:
        """The cached result, or None when there is none or it cannot be read (then it is recomputed)."""
        if self.root is None or not self._path(fp, key).is_file():
            return None
        try:
            value = json.loads(self._path(fp, key).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("ignoring the unreadable cached result %s (%s); it will be recomputed", self._path(fp, key), e)
            return None
        return value if isinstance(value, dict) else None

    def put(self, fp: str, key: str, value: dict) -> None:
        if self.root is None:
            return
        p = self._path(fp, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(value)
        atomic_write(p, lambda tmp: tmp.write_text(text))


def fingerprint(*parts: Any, files: list[Path] = ()) -> str:
    """A short stable id from `parts` and the contents of `files` (compress.digest, hashed on all cores: a
    changed byte changes it, a copy or a touch does not)."""
    h = hashlib.sha256(json.dumps(parts, default=str).encode())
    if files:
        h.update(digest.files_digest(sorted(Path(f) for f in files)).encode())
    return h.hexdigest()[:20]


@dataclass
class Report:
    suite: str
    entries: list[Entry]
    results: dict[str, list[dict | None]]  # task key -> one result per entry (None = skipped)
    skipped: dict[str, str]  # task key -> why
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "seconds": self.seconds, "skipped": self.skipped,
                "models": [{"name": e.name, "fingerprint": e.fingerprint, **e.facts,
                            "tasks": {k: v[i] for k, v in self.results.items()}}
                           for i, e in enumerate(self.entries)]}


def run(suite: str | tuple[Task, ...], entries: list[Entry], tokenizer: Any, cache: Cache,
        progress: Callable[[str, int, int], None] | None = None, name: str = "custom") -> Report:
    """Run every task of `suite` (a name in SUITES, or tasks) on `entries` (the first is the original),
    reusing cached results."""
    if isinstance(suite, str):
        if suite not in SUITES:
            raise CompressError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
        name, task_list = suite, SUITES[suite]
    else:
        task_list = suite
    t0 = time.perf_counter()
    progress = progress or (lambda *a: None)
    results: dict[str, list[dict | None]] = {}
    skipped: dict[str, str] = {}
    for task in task_list:
        # a comparison task must see the original whenever any other model needs scoring
        ref_fp = entries[0].fingerprint
        keys = [f"{task.key}-vs-{ref_fp}" if i and isinstance(task, Perplexity) else task.key
                for i in range(len(entries))]
        got = [cache.get(e.fingerprint, k) for e, k in zip(entries, keys, strict=True)]
        if all(g is not None for g in got):
            results[task.key] = got
            continue
        todo = [i for i, g in enumerate(got) if g is None]
        if isinstance(task, Perplexity) and 0 not in todo:
            todo = [0, *todo]  # KL needs the original's distributions
        try:
            inputs = task.prepare(tokenizer)
        except CompressError as e:  # the task's data is not available here (a hub dataset while offline)
            skipped[task.key] = str(e)
            log.warning("skipped %s: %s", task.key, e)
            continue
        fresh = task.score([entries[i] for i in todo], inputs, progress)  # type: ignore[arg-type]
        for i, r in zip(todo, fresh, strict=True):
            got[i] = r
            cache.put(entries[i].fingerprint, keys[i], r)
        results[task.key] = got
    return Report(name, entries, results, skipped, time.perf_counter() - t0)


def markdown(report: Report) -> str:
    """One table: a row per model, columns for its facts and every task's headline metrics."""
    cols = ["model", "bits (codes / total)", "disk MB (10^6 B)"]
    for key in report.results:
        cols += ([f"{key} ppl", "KL / token", "top-1", "tokens/s", "in memory MB"] if key.startswith("ppl")
                 else [f"{key} acc ± se"])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, e in enumerate(report.entries):
        b = e.facts.get("bits")
        row = [e.name, "-" if not b else f"{b[0]:.3f} / {b[1]:.3f}",
               "-" if e.facts.get("disk_bytes") is None else f"{e.facts['disk_bytes'] / 1e6:.1f}"]
        for key, rs in report.results.items():
            r = rs[i] or {}
            if key.startswith("ppl"):
                row += [_f(r.get("ppl"), ".3f"), _f(r.get("kl_mean"), ".4f"), _f(r.get("top1"), ".2%"),
                        _f(r.get("tokens_per_s"), ".0f"),
                        _f(None if r.get("memory_bytes") is None else r["memory_bytes"] / 1e6, ".1f")]
            elif key.startswith("mc"):
                row.append("-" if "accuracy" not in r else f"{r['accuracy']:.1%} ± {r['stderr']:.1%}")
            else:  # lm-eval: accuracy ± stderr per task
                accs = {k.split("/")[0]: v for k, v in r.items() if k.endswith("/acc")}
                row.append(", ".join(f"{t} {v:.1%} ± {r.get(f'{t}/acc_stderr', 0):.1%}" for t, v in accs.items())
                           or "-")
        lines.append("| " + " | ".join(row) + " |")
    for key, why in report.skipped.items():
        lines.append(f"\nskipped {key}: {why}")
    return "\n".join(lines)


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def plot(report: Report, path: Path) -> Path | None:
    """Quality against average bits (PNG); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k in report.results if k.startswith(("ppl", "mc"))]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        metric = "ppl" if key.startswith("ppl") else "accuracy"
        for i, e in enumerate(report.entries):
            r = report.results[key][i]
            if r is None or r.get(metric) is None:
                continue
            b = e.facts.get("bits")
            if i == 0 or not b:
                ax.axhline(r[metric], color="gray", ls="--", lw=1)
                ax.annotate(e.name, (0.01, r[metric]), xycoords=("axes fraction", "data"), fontsize=8)
                continue
            err = r.get("stderr")
            ax.errorbar(b[1], r[metric], yerr=err, fmt="o")
            ax.annotate(e.name, (b[1], r[metric]), fontsize=8, textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("bits per weight (with scales/zeros)")
        ax.set_ylabel(metric)
        ax.set_title(key, fontsize=9)
        if metric == "ppl":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
