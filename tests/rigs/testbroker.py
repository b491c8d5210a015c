"""A broker for launch-mode tests, run by the helper as the broker account.

argv: LIBDIR KEYFILE SPEC_JSON, where SPEC_JSON is a list of {"user", "uid", "stdin"}.
Prints one JSON line per spawn ({"user", "pid", "report"} or {"user", "refused"}), then
"ready", then waits until the helper connection closes (or it is killed).
"""

import asyncio
import json
import os
import sys

sys.path.insert(0, sys.argv[1])

from broker.helper_client import HelperClient, HelperRefused  # noqa: E402


def emit(obj) -> None:
    print(json.dumps(obj), flush=True)


async def main() -> None:
    key = open(sys.argv[2], "rb").read()
    client = await HelperClient.connect_fd(int(os.environ["MEP_HELPER_FD"]), key,
                                           on_exit=lambda pid, status: emit({"exited": pid, "status": status}))
    emit({"broker_pid": os.getpid(), "uid": os.getuid(), "env": dict(os.environ)})
    for spec in json.loads(sys.argv[3]):
        try:
            result = await client.spawn(spec["user"], spec["uid"], "uep", stdin=spec.get("stdin", "").encode(),
                                        channels=("audit",))
        except HelperRefused as e:
            emit({"user": spec["user"], "refused": e.code, "reason": e.reason})
            continue
        line = await asyncio.get_running_loop().run_in_executor(None, os.fdopen(result.fds["audit"], "rb").readline)
        emit({"user": spec["user"], "pid": result.pid, "report": json.loads(line)})
    emit("ready")
    await client.closed


asyncio.run(main())
