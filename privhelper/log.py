"""The helper's log: one line per event, written straight to fd 2 (unbuffered: a fork never repeats
a line). Not `logging`: it imports threading, whose at-fork hooks cost each child a spawn forks ~0.4 ms."""

import contextlib
import functools
import os


def _write(level: str, msg: str, *args) -> None:
    with contextlib.suppress(OSError):  # as with logging: a log that cannot be written must not stop the UEPs
        os.write(2, f"mep-privhelper[{os.getpid()}] {level} {msg % args if args else msg}\n".encode("utf-8", "replace"))


info, warning, error = (functools.partial(_write, level) for level in ("INFO", "WARNING", "ERROR"))
