"""mepctl's side of the admin socket (broker/admin.py): send one request, print the reply
for a person, or as JSON with --json."""

from __future__ import annotations

import json
import pathlib
import socket
import sys


class NotRunning(Exception):
    pass


def call(path: pathlib.Path, request: dict, timeout: float = 60.0) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise NotRunning(f"no broker answers at {path} ({e.strerror})") from None
    with sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise NotRunning(f"the broker at {path} closed the connection without answering")
    return json.loads(data)


def uptime(seconds: int) -> str:
    days, rest = divmod(int(seconds), 86400)
    return (f"{days}d " if days else "") + f"{rest // 3600}:{rest // 60 % 60:02d}:{rest % 60:02d}"


def show(op: str, reply: dict, as_json: bool, out=sys.stdout) -> int:
    """Print a reply; the exit code: 0, or 1 for a refused request."""
    if as_json:
        print(json.dumps(reply, indent=2), file=out)
        return 0 if reply.get("ok") else 1
    if not reply.get("ok"):
        print(f"mepctl {op}: {reply.get('error')}", file=sys.stderr)
        if reply.get("user_message"):
            print(f"  the user would be told: {reply['user_message']}", file=sys.stderr)
        return 1
    if op == "status":
        fields = [("endpoint", reply["name"]), ("endpoint id", reply["endpoint_id"]),
                  ("display name", reply["display_name"]), ("broker", f"pid {reply['pid']} as {reply['user']}"),
                  ("uptime", uptime(reply["uptime_s"])), ("user endpoints", reply["user_endpoints"]),
                  ("AMQP", reply["amqp"]), ("high assurance", reply["high_assurance"]),
                  ("identity mapping", reply["identity_mapping"]), ("config dir", reply["config_dir"])]
        for key, value in fields:
            print(f"{key + ':':<18}{value}", file=out)
    elif op == "list":
        rows = [(u["user"], str(u["uid"]), str(u["pid"]), uptime(u["uptime_s"]), u["name"])
                for u in reply["user_endpoints"]]
        header = ("USER", "UID", "PID", "UPTIME", "USER ENDPOINT ID")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        for row in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4], file=out)
        if not rows:
            print("(no user endpoints running)", file=out)
    elif op == "stop-uep":
        print(f"sent TERM to user endpoint {reply['name']} (pid {reply['pid']}, user {reply['user']})", file=out)
    elif op == "reload":
        print("configuration checked; the broker is re-executing in place (same pid, user endpoints kept)", file=out)
    elif op == "stop":
        print("the broker is stopping every user endpoint, then itself", file=out)
    elif op == "check-idmap":
        if not reply["mapped"]:
            print(f"no rule of {reply['path']} maps this identity set: its starts would be refused with "
                  "\"Identity failed to map to a local user name.\"", file=out)
            return 1
        local = f"uid {reply['uid']}" if reply["exists"] else "NO SUCH LOCAL USER: its starts would be refused"
        print(f"{reply['identity']} -> {reply['username']} ({local})\n  matched by {reply['rule']} of {reply['path']}",
              file=out)
        return 0 if reply["exists"] else 1
    elif op == "render-user-config":
        print(f"# user endpoint configuration for {reply['username']} (identity mapped by {reply['rule']})", file=out)
        for what in reply["overrides"]:
            print(f"# overridden by the MEP: {what}", file=out)
        print(reply["yaml"], end="" if reply["yaml"].endswith("\n") else "\n", file=out)
    return 0
