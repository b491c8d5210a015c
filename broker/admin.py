"""The admin socket: how `mepctl` talks to a running broker.

One JSON request per connection, one JSON reply, each a single line. The socket lives in
NAME/run/ (created by `mepctl configure`: the broker account's own directory, mode 0700)
and is itself 0600, so only the broker account and root can connect; every connection is
checked again with SO_PEERCRED. Dry runs (render-user-config, check-idmap) execute here,
as the broker account, never as root: an external identity mapper or a template is the
administrator's code, but it has no business running with root's rights.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import pwd
import socket
import stat
import struct
import time

from broker import layout, mapping, rendering
from broker.refusal import Refused

MAX_REQUEST = 1 << 20


class AdminError(Exception):
    pass


def socket_path(conf_dir: pathlib.Path) -> pathlib.Path:
    return layout.socket_file(conf_dir)


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def check_run_dir(path: pathlib.Path) -> None:
    """The directory must be ours alone, or someone else could swap the socket."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise AdminError(f"{path}: {e.strerror}; `mepctl configure` creates it (owner: the broker account, "
                         "mode 0700)") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise AdminError(f"{path} must be a directory owned by {pwd.getpwuid(os.getuid()).pw_name} with mode 0700 "
                         f"(it is {stat.filemode(st.st_mode)}, uid {st.st_uid})")


def identity_set(value) -> list:
    """An identity document as mepctl sends it: one identity or a list of them."""
    if isinstance(value, dict):
        value = value.get("identity_set", [value])
    if not isinstance(value, list) or not value or not all(isinstance(i, dict) for i in value):
        raise AdminError("the identity file must hold an identity object ({\"id\": ..., \"username\": ...}) or a "
                         "non-empty list of them, as the service sends in globus_identity_set")
    return value


def amqp_state(mep) -> str:
    if mep.amqp is not None and mep.amqp_lost_at is not None:
        return (f"reconnecting: lost {round(time.time() - mep.amqp_lost_at)} s ago, {mep.amqp_failures} attempts "
                f"failed, the next within {mep.amqp.reconnect_interval:g} s")
    return "connected" if mep.amqp is not None and not mep.amqp.is_closed else "not connected"


class AdminServer:
    def __init__(self, path: pathlib.Path, mep, log, reload):
        self.path, self.mep, self.log, self.reload = path, mep, log, reload
        self.server = None

    async def start(self) -> None:
        check_run_dir(self.path.parent)
        if self.path.is_socket():  # left by a previous broker (or the image before a re-exec)
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            try:
                self.path.unlink()  # a re-exec'd image makes a new one
            except OSError:
                pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = peer_uid(writer.get_extra_info("socket"))
        try:
            if uid not in (0, os.getuid()):
                self.log.warning("admin connection refused", peer_uid=uid)
                reply = {"ok": False, "error": "only root and the broker account may use the admin socket"}
            else:
                reply = await self._serve(await asyncio.wait_for(reader.readline(), 10), uid)
        except (asyncio.TimeoutError, ValueError, ConnectionError) as e:
            reply = {"ok": False, "error": f"bad request: ({type(e).__name__}) {e}"}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            writer.close()
        except ConnectionError:
            pass

    async def _serve(self, line: bytes, uid: int) -> dict:
        try:
            request = json.loads(line)
            op = request["op"]
            handler = getattr(self, "op_" + op.replace("-", "_"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return {"ok": False, "error": f"unknown or malformed request: {line[:100]!r}"}
        self.log.info("admin request", op=op, peer_uid=uid)
        try:
            return {"ok": True, **await handler(request)}
        except AdminError as e:
            return {"ok": False, "error": str(e)}
        except Refused as e:  # what the log would say, and what the user would be told
            return {"ok": False, "error": e.reason, "user_message": e.user_message}

    # -- operations (each returns the reply's fields) -----------------------------------

    async def op_status(self, _request) -> dict:
        mep, config = self.mep, self.mep.config
        return {"name": config.name, "endpoint_id": mep.endpoint_id, "display_name": config.display_name,
                "pid": os.getpid(), "user": pwd.getpwuid(os.getuid()).pw_name, "uptime_s": round(time.time() - mep.started),
                "user_endpoints": len(mep.uep), "high_assurance": config.high_assurance,
                "amqp": amqp_state(mep),
                "identity_mapping": str(mep.idmap.path), "config_dir": str(config.conf_dir)}

    async def op_list(self, _request) -> dict:
        return {"user_endpoints": [{"name": u.name, "user": u.username, "uid": u.uid, "pid": u.pid,
                                    "identity": u.identity, "uptime_s": round(u.uptime())}
                                   for u in sorted(self.mep.uep, key=lambda u: u.started)]}

    async def op_stop_uep(self, request) -> dict:
        target = request.get("uep")
        uep = self.mep.uep.by_name.get(target) or self.mep.uep.by_pid.get(target if isinstance(target, int) else -1)
        if uep is None:
            raise AdminError(f"no running user endpoint {target!r}; `mepctl list` shows them")
        await self.mep.stop_uep(uep)
        self.log.info("user endpoint stopped by the administrator", uep=uep.name, pid=uep.pid, user=uep.username)
        return {"name": uep.name, "pid": uep.pid, "user": uep.username}

    async def op_stop(self, _request) -> dict:
        self.log.info("stop requested by the administrator")
        self.mep.stopping.set()
        return {"stopping": True}

    async def op_reload(self, _request) -> dict:
        error = self.reload("mepctl reload")
        if error:
            raise AdminError(f"reload refused; the running configuration stays: {error}")
        return {"reloading": True}

    async def op_check_idmap(self, request) -> dict:
        identities = identity_set(request.get("identity"))
        mapped = await asyncio.to_thread(self.mep.idmap.map, identities)
        if mapped is None:
            return {"mapped": False, "path": str(self.mep.idmap.path)}
        try:
            account = pwd.getpwnam(mapped.username)
            local = {"uid": account.pw_uid, "exists": True}
        except KeyError:
            local = {"exists": False}
        return {"mapped": True, "username": mapped.username, "identity": mapped.identity, "rule": mapped.rule,
                "path": str(self.mep.idmap.path), **local}

    async def op_render_user_config(self, request) -> dict:
        options, runtime = request.get("options") or {}, request.get("runtime") or {}
        if not isinstance(options, dict) or not isinstance(runtime, dict):
            raise AdminError("options and runtime must be JSON objects")
        account = await mapping.account_for(self.mep.idmap, identity_set(request.get("identity")))
        rendered = rendering.render(self.mep.config, account, options, runtime, self.log, "dry-run")
        return {"username": account.username, "rule": account.mapped.rule, "yaml": rendered.text,
                "overrides": list(rendered.overrides)}
