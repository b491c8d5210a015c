"""The helper's log: a line per event on stderr (line-buffered: a fork never repeats one). Not `logging`:
it imports threading, whose at-fork hooks cost each child a spawn forks ~0.4 ms (docs/performance.md)."""

import contextlib
import functools
import os
import sys


def _write(level: str, msg: str, *args) -> None:
    with contextlib.suppress(OSError):  # as with logging: a log that cannot be written must not stop the UEPs
        sys.stderr.write(f"mep-privhelper[{os.getpid()}] {level} {msg % args if args else msg}\n")


info, warning, error = (functools.partial(_write, level) for level in ("INFO", "WARNING", "ERROR"))
