"""Ctrl-C while the `compress` command starts: one line "interrupted" and exit status 130, never a traceback.

`import compress` imports torch and transformers (seconds), before `compress.cli.main` runs and can catch
anything: a KeyboardInterrupt raised inside those imports escapes as a traceback. So the package's first
import is this module, whose `at_startup()` (run on import) installs, when this process is the command line (the
`compress` script or `python -m compress`, also under torchrun) and nobody else handles SIGINT, a handler that
writes the line and ends the process at once. `os._exit` and not an exception: unwinding through a half-imported
C extension can print more, and before `main()` nothing has been written that would need cleaning up. `main()`
then calls `handled_by_main()` to put Python's own handler back, so Ctrl-C during the command is a KeyboardInterrupt
again, which the command turns into the same line after keeping its finished work (compress/cli.py).

A library user's process (argv[0] of another program) never gets the handler.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

MESSAGE = b"interrupted\n"
CODE = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C


def _exit_now(signum: int, frame: FrameType | None) -> None:
    os.write(2, MESSAGE)
    os._exit(CODE)


def is_command_line() -> bool:
    """This process runs `compress` itself: the console script, or `python -m compress` (argv[0] is "-m" while
    the package of the module to run is imported)."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or os.path.basename(argv0) in ("compress", "compress.exe", "compress-script.py")


def at_startup() -> None:
    """Install the start-up handler (see the module docstring); a no-op outside the command line, off the main
    thread, or when the process already handles SIGINT its own way."""
    if (is_command_line() and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _exit_now)


def handled_by_main() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt (the command line catches it); only our own handler is
    replaced."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _exit_now:
        signal.signal(signal.SIGINT, signal.default_int_handler)


at_startup()  # on import: the package imports this module before anything slow (compress/__init__.py)
