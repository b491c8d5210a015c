"""The broker process: `python3 -I -m broker.main --conf-dir DIR --key FILE`.

Started by the root helper as the broker account, with the helper connection on the fd
named by MEP_HELPER_FD (socketpair launch) or connected to the helper's socket
(socket activation, --helper-socket).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import socket
import sys

from broker import logs
from broker.audit import AuditLog
from broker.config import REGISTRATION, ConfigError, load_config
from broker.helper_client import HelperClient
from broker.idmap import IdentityMapper, MappingConfigError
from broker.mep import MEP, load_registration

EX_CONFIG, EX_UNAVAILABLE = 78, 69


def parse_args(argv):
    p = argparse.ArgumentParser(prog="mep-broker", description="The unprivileged broker of a multi-user compute "
                                "endpoint. Normally started by `mepctl start`, never by hand.")
    p.add_argument("--conf-dir", required=True, type=pathlib.Path, help="the MEP's configuration directory")
    p.add_argument("--key", required=True, help="the per-MEP helper key file (group-readable by the broker)")
    p.add_argument("--helper-socket", help="connect to the socket-activated helper at this path "
                   "(default: the fd in MEP_HELPER_FD)")
    p.add_argument("--log-to-console", action="store_true", help="log to stderr as well as endpoint.log")
    p.add_argument("--debug", action="store_true", help="log at debug level")
    return p.parse_args(argv)


async def run(args) -> int:
    try:
        config = load_config(args.conf_dir)
    except ConfigError as e:
        print(f"mep-broker: {e}", file=sys.stderr)
        return EX_CONFIG
    try:
        logs.setup(config.conf_dir / "endpoint.log", console=args.log_to_console, debug=args.debug or config.debug)
    except OSError as e:
        logs.setup(None, debug=args.debug)
        logs.get().error("cannot write endpoint.log; logging to stderr only", error=str(e))
    log = logs.get().bind(mep=config.name)
    try:
        registration = load_registration(config.conf_dir / REGISTRATION)
        idmap = IdentityMapper(config.identity_mapping_config_path, str(registration["endpoint_id"]), log)
        key = pathlib.Path(args.key).read_bytes()
    except (OSError, ValueError, KeyError, MappingConfigError) as e:
        log.error("cannot start", error=f"({type(e).__name__}) {e}")
        return EX_CONFIG
    if args.helper_socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.helper_socket)
        fd = sock.detach()
    else:
        fd = int(os.environ.pop("MEP_HELPER_FD"))
    audit = None
    if config.high_assurance and config.audit_log_path:
        try:
            audit = AuditLog(config.audit_log_path, str(registration["endpoint_id"]), log)
        except OSError as e:
            log.error("cannot open the audit log; a high-assurance MEP does not start without it",
                      path=str(config.audit_log_path), error=e.strerror)
            return EX_CONFIG
    helper = await HelperClient.connect_fd(fd, key)
    mep = MEP(config, registration, helper, idmap, log, audit)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("stop signal", signal=signal.Signals(s).name),
                                                    mep.stopping.set()))
    watcher = asyncio.ensure_future(idmap.watch())
    log.info("broker started", uid=os.getuid(), pid=os.getpid(), endpoint_id=mep.endpoint_id,
             display_name=config.display_name, high_assurance=config.high_assurance)
    code = 0
    try:
        await mep.serve()
    except Exception as e:  # noqa: BLE001 - say why, then stop every UEP below
        log.exception("broker failed", error=str(e))
        code = EX_UNAVAILABLE
    if helper.closed.done():
        log.error("the helper connection closed; stopping", reason=str(helper.closed.result()))
        code = code or EX_UNAVAILABLE
    await mep.stop(config.mu_child_ep_grace_period_s)
    watcher.cancel()
    if audit is not None:
        audit.close()
    helper.close()
    log.info("broker stopped", code=code)
    return code


def main(argv=None) -> int:
    return asyncio.run(run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
