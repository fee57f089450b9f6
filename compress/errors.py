"""The one exception type users see.

A `CompressError` carries a single line that names the problem and the fix. The CLI prints it
without a traceback; anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class CompressError(Exception):
    """A user-facing error: bad input, missing files, offline hub, numerical trouble."""
