"""The one refusal of a start: what its user is told, and what the administrator's log says.

Every stage of the start pipeline (broker/pipeline.py) that will not go on raises
`Refused`: `user_message` goes into the failure notice (broker/notices.py), `reason` and
`log_fields` into the log line, and `kwargs` (the command's kwargs, when the refusal comes
before the command is parsed) carry the credentials that notice needs. `str()` is always
the log's text; the user's text is always `user_message`. Standard library only.
"""

from __future__ import annotations


class Refused(Exception):
    def __init__(self, user_message: str, reason: str | None = None, *, kwargs: dict | None = None, **log_fields):
        super().__init__(reason or user_message)
        self.user_message = user_message
        self.reason = reason or user_message
        self.kwargs = kwargs if isinstance(kwargs, dict) else {}
        self.log_fields = log_fields

    def for_log(self) -> dict:
        return {"reason": self.reason, **self.log_fields}
