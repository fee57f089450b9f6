"""The fuzz suite's tally (issue 18): every module here is one class of bad input or fault, and every case says
what the toolkit did with it through the `verdict` fixture:

    verdict("error")     refused with one CompressError line that names the problem (no traceback)
    verdict("correct")   a correct result (the bad input was harmless, or the fault was recovered exactly)

At the end of a run that collected this folder, the terminal summary prints one row per class: cases, clear
errors, correct results, and failures (a case that failed its assertions, or passed without a verdict).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

VERDICTS = ("error", "correct")
_recorded: dict[str, str] = {}  # nodeid -> verdict
_outcome: dict[str, str] = {}  # nodeid -> passed / failed / skipped
_classes: dict[str, str] = {}  # module file name -> the first line of its docstring


@pytest.fixture
def verdict(request: pytest.FixtureRequest) -> Callable[[str], None]:
    def record(kind: str) -> None:
        assert kind in VERDICTS, kind
        _recorded[request.node.nodeid] = kind
    return record


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        mod = getattr(item, "module", None)
        if mod is not None and Path(str(mod.__file__)).parent == Path(__file__).parent:
            _classes[Path(str(mod.__file__)).name] = (mod.__doc__ or mod.__name__).strip().splitlines()[0]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    done = report.when == "call" or report.outcome in ("failed", "skipped")
    if done and _outcome.get(report.nodeid) != "failed":
        _outcome[report.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for nodeid, outcome in _outcome.items():
        module = nodeid.split("::")[0].replace("\\", "/").rsplit("/", 1)[-1]
        if module not in _classes:
            continue
        row = rows[module]
        row["cases"] += 1
        if outcome == "skipped":
            row["skipped"] += 1
        elif outcome == "failed" or nodeid not in _recorded:
            row["failed"] += 1
        else:
            row[_recorded[nodeid]] += 1
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("=", "fuzz tally (issue 18): cases and verdicts per class of bad input or fault")
    tr.write_line(f"{'class':<60} {'cases':>5} {'error':>6} {'correct':>7} {'failed':>6} {'skipped':>7}")
    total: dict[str, int] = defaultdict(int)
    for module in sorted(rows):
        r = rows[module]
        for k, v in r.items():
            total[k] += v
        tr.write_line(f"{_classes[module][:60]:<60} {r['cases']:>5} {r['error']:>6} {r['correct']:>7} "
                      f"{r['failed']:>6} {r['skipped']:>7}")
    tr.write_line(f"{'all':<60} {total['cases']:>5} {total['error']:>6} {total['correct']:>7} "
                  f"{total['failed']:>6} {total['skipped']:>7}")
