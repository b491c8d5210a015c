"""Which start commands were being handled when the broker or its helper last stopped.

A command is acknowledged only once its outcome is known, so a broker that dies while
it handles one leaves it to be delivered again: nothing is lost. But if that command is
what killed the broker (or the helper connection), the next broker would die of it too,
and the next: a crash loop. So the broker counts, on disk, how often the handling of
each command began without ending:

    first delivery     begins (count 1); a crash leaves it in the journal
    second delivery    begins again (count 2): the retry every interrupted command gets
    third delivery     refused with a failure notice and acknowledged

A command that merely met another command's crash is retried like any other; only one
whose handling was cut short twice is refused. Commands are known by the SHA-256 of
their body. The file lives in the broker's run directory, NAME/run/inflight.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time

MAX_BEGUN = 2  # handlings begun without an outcome, after which a command is refused
FORGET_AFTER_S = 3600  # far past the 180 s after which a command is refused as too old


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class Journal:
    """{digest: [times begun, first begun at]}; written at every change (a few entries)."""

    def __init__(self, path: pathlib.Path, log):
        self.path, self.log = path, log
        self.entries: dict[str, list] = {}
        try:
            loaded = json.loads(path.read_text())
            now = time.time()
            self.entries = {k: v for k, v in loaded.items() if now - v[1] < FORGET_AFTER_S}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError, IndexError) as e:
            log.error("the journal of interrupted start commands is unreadable; starting a new one",
                      path=str(path), error=f"({type(e).__name__}) {e}")

    def interrupted(self, key: str) -> int:
        """How often the handling of this command began and never ended."""
        return self.entries.get(key, [0])[0]

    def begin(self, key: str) -> None:
        count, first = self.entries.get(key, [0, time.time()])
        self.entries[key] = [count + 1, first]
        self._save()

    def end(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError as e:  # the broker serves on; only the crash-loop guard is weakened
            self.log.error("cannot write the journal of start commands in hand; a command that crashes the "
                           "endpoint may be retried more than once", path=str(self.path), error=e.strerror)
