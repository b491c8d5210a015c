"""The broker process: `python3 -I -m broker.main --conf-dir DIR --key FILE`.

Started by the root helper as the broker account, with the helper connection on the fd
named by MEP_HELPER_FD (socketpair launch) or connected to the helper's socket
(socket activation, --helper-socket). SIGHUP re-executes it in place (broker/reexec.py);
SIGTERM, SIGINT and SIGQUIT stop it and every UEP.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import socket
import sys
import time

import attrs

os.environ["SPT_NOENV"] = "1"  # setproctitle: the title fits in argv; the environment stays readable in /proc
import setproctitle  # noqa: E402

from broker import console, heartbeat as heartbeat_mod, layout, lock, logs, reexec, registration as registration_mod, tls
from broker.admin import AdminError, AdminServer, socket_path
from broker.audit import AuditLog
from broker.commands import StartCommand
from broker.config import ConfigError, MEPConfig, load_config
from broker.helper_client import HelperClient, InvalidRequest
from broker.idmap import IdentityMapper, MappingConfigError
from broker.mep import MEP
from broker.registry import UEP
from broker.protocol_session import BrokerSession

EX_SOFTWARE, EX_CONFIG, EX_UNAVAILABLE = 70, 78, 69
QUIESCE_S = 30  # a reload waits this long for helper requests in flight, else it is postponed
REREGISTER_CALM_S = 60  # re-registrations closer together than this back off (registration.first_delay)


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


@attrs.frozen
class Setup:
    """Everything the broker reads at start; a reload reads it again first, to check it."""
    config: MEPConfig
    registration: dict
    idmap: IdentityMapper
    key: bytes


def read_setup(args, log, register: bool = True, config: MEPConfig | None = None,
               registration: dict | None = None) -> Setup:
    """Raises one of SETUP_ERRORS, each naming the file or the service. Without
    `register`, the endpoint id is read from disk and the service is not asked; with
    `registration` (a re-exec'd image, or one obtained already), it is used."""
    config = config or load_config(args.conf_dir)
    if registration is None:
        registration = registration_mod.obtain(config, log) if register else {
            "endpoint_id": registration_mod.peek(config)}
    idmap = IdentityMapper(config.identity_mapping_config_path, str(registration["endpoint_id"]), log)
    return Setup(config, registration, idmap, pathlib.Path(args.key).read_bytes())


SETUP_ERRORS = (ConfigError, MappingConfigError, registration_mod.RegistrationError, OSError, ValueError, KeyError)


def pam_problem(config: MEPConfig, helper_pam: str) -> str | None:
    """config.yaml's `pam:` (the seed's) against the root helper's policy, which decides.
    They must agree: a PAM setting that silently does nothing is worse than a refusal."""
    want = config.pam.service_name if config.pam.enable else ""
    if want == helper_pam:
        return None
    def said(service):
        return f"PAM on with service {service!r}" if service else "PAM off"
    return (f"{layout.config_file(config.conf_dir)} says {said(want)} (pam: enable, service_name), but the root helper's "
            f"policy says {said(helper_pam)} ([pam] enabled and service in {layout.policy_file(config.conf_dir)}, "
            "or in the file given to `mepctl start --policy`); the policy decides what runs: edit one of the two "
            "files so that they agree, then start again")


def reload_problem(args, running: Setup, log, helper_pam: str) -> str | None:
    """Why the configuration on disk cannot replace the running one, or None."""
    try:
        new = read_setup(args, log, register=False)
    except SETUP_ERRORS as e:
        return f"({type(e).__name__}) {e}"
    if new.config.high_assurance != running.config.high_assurance:
        return "high_assurance cannot change while the MEP runs (nor after registration)"
    if str(new.registration["endpoint_id"]) != str(running.registration["endpoint_id"]):
        return "the endpoint id changed; stop the MEP and start it again"
    if new.key != running.key:
        return "the helper key changed; the helper still holds the old one: restart the MEP"
    return pam_problem(new.config, helper_pam)


def connect_helper(args, key: bytes, state: dict | None):
    if state is not None:  # a re-exec'd image: go on with the authenticated session
        session = BrokerSession.resume(key, **state["session"])
        return HelperClient(socket.socket(fileno=state["helper_fd"]), key, session=session)
    if args.helper_socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.helper_socket)
        return HelperClient(sock, key)
    return HelperClient(socket.socket(fileno=int(os.environ.pop(reexec.HELPER_ENV))), key)


def restore(mep: MEP, state: dict) -> None:
    mep.started, mep.helper.next_req = state["started"], state["next_req"]
    for record in state["ueps"]:
        uep = UEP.resume(record, StartCommand)
        mep.uep.add(uep)
        if uep.audit_pipe is not None and mep.audit is not None:
            mep.audit.watch(uep.audit_pipe, uep)


async def run(args) -> int:
    try:
        state = reexec.load()
        config = load_config(args.conf_dir)
    except (ConfigError, ValueError, OSError) as e:
        print(f"mep-broker: {e}", file=sys.stderr)
        return EX_CONFIG
    try:
        logs.setup(layout.log_file(config.conf_dir), console=args.log_to_console, debug=args.debug or config.debug)
    except OSError as e:
        logs.setup(None, debug=args.debug)
        logs.get().error("cannot write endpoint.log; logging to stderr only", error=str(e))
    log = logs.get().bind(mep=config.name)
    try:  # before the registration and the admin socket, which a second broker would take over
        lock_fd = lock.acquire(config.conf_dir, config.name)
    except (lock.AlreadyRunning, OSError) as e:
        log.error("cannot start", error=str(e))
        if not args.log_to_console:
            print(f"mep-broker: cannot start: {e}", file=sys.stderr)
        return EX_CONFIG
    try:
        key = pathlib.Path(args.key).read_bytes()
    except OSError as e:
        log.error("cannot start", error=f"({type(e).__name__}) {e}")
        return EX_CONFIG
    # the helper first: it waits only io_timeout for the hello, and registering may have
    # to wait for Globus (broker/registration.py: obtain_retrying)
    helper = connect_helper(args, key, state)
    await helper.ready
    if problem := pam_problem(config, helper.session.helper_pam):
        log.error("cannot start", error=problem)
        if not args.log_to_console:
            print(f"mep-broker: cannot start: {problem}", file=sys.stderr)
        helper.close()
        return EX_CONFIG
    try:
        registration = state.get("registration") if state is not None else None
        if registration is None:
            read_setup(args, log, register=False, config=config)  # a broken config stops here, before Globus
            registration = await registration_mod.obtain_retrying(config, log)
        setup = read_setup(args, log, config=config, registration=registration)
    except SETUP_ERRORS as e:
        log.error("cannot start", error=f"({type(e).__name__}) {e}")
        return EX_CONFIG
    audit = None
    if setup.config.high_assurance and setup.config.audit_log_path:
        try:
            audit = AuditLog(setup.config.audit_log_path, str(setup.registration["endpoint_id"]), log,
                             resumed=state is not None)
        except OSError as e:
            log.error("cannot open the audit log; a high-assurance MEP does not start without it",
                      path=str(setup.config.audit_log_path), error=e.strerror)
            return EX_CONFIG
    mep = MEP(setup.config, setup.registration, helper, setup.idmap, log, audit)
    if state is not None:
        restore(mep, state)  # before the loop runs again: an `exited` may be waiting
    return await Broker(args, setup, mep, log, lock_fd).run(resumed=state is not None)


class Broker:
    """The process around the MEP: signals, admin socket, timer line, reload and stop."""

    def __init__(self, args, setup: Setup, mep: MEP, log, lock_fd: int):
        self.args, self.setup, self.mep, self.log, self.lock_fd = args, setup, mep, log, lock_fd
        self.admin = AdminServer(socket_path(setup.config.conf_dir), mep, log, self.request_reload)
        self.heartbeat = heartbeat_mod.Heartbeat(mep.registration, heartbeat_mod.period(setup.config), log)
        self._reregistered_at, self._reregistrations = float("-inf"), 0

    def request_reload(self, by: str) -> str | None:
        """Check the configuration on disk; if it is usable, have serve() return for a
        re-exec. Returns why not, if not."""
        problem = reload_problem(self.args, self.setup, self.log, self.mep.helper.session.helper_pam)
        if problem:
            self.log.error("reload refused; the running configuration stays", requested_by=by, reason=problem)
        else:
            self.log.info("reload requested", requested_by=by)
            self.mep.reloading.set()
        return problem

    def _signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(sig, lambda s=sig: (self.log.info("stop signal", signal=signal.Signals(s).name),
                                                        self.mep.stopping.set()))
        loop.add_signal_handler(signal.SIGHUP, self.request_reload, "SIGHUP")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, reexec.HELD_SIGNALS)  # what arrived during a re-exec comes now

    async def run(self, resumed: bool) -> int:
        mep, log, config = self.mep, self.log, self.setup.config
        self._signals()
        # the seed's `ps -eF --forest | perl ...` recipe finds the MEP by these titles
        setproctitle.setproctitle(f"Globus Compute Endpoint *({mep.endpoint_id}, {config.name}) [broker]")
        if not resumed:
            try:
                await mep.helper.title(mep.endpoint_id, config.name)
            except InvalidRequest as e:
                log.warning("the root helper's process title is left as it is", error=str(e))
        background = await self._start_background(resumed)
        if resumed:
            log.info("broker re-executed in place", pid=os.getpid(), user_endpoints=len(mep.uep))
        else:
            log.info("broker started", uid=os.getuid(), pid=os.getpid(), endpoint_id=mep.endpoint_id,
                     display_name=config.display_name, high_assurance=config.high_assurance,
                     console=self.args.log_to_console, debug=self.args.debug)
        code = 0
        while True:
            try:
                reason = await mep.serve()
            except Exception as e:  # noqa: BLE001 - say why, then stop every UEP below
                if (cert := tls.refused(e, mep.registration.get("command_queue_info", {}).get("connection_url"))):
                    log.error("AMQP server's TLS certificate refused; not connecting", **cert)
                else:
                    log.exception("broker failed", error=str(e))
                code, reason = EX_UNAVAILABLE, "failed"
            if reason == "duplicate":
                code = EX_CONFIG
            if reason == "reregister":  # RabbitMQ refused the account: fresh credentials from the service
                if not await self.reregister():
                    break
                continue
            if reason != "reload":
                break
            await self.restart_in_place(background)  # returns only if it could not
            mep.reloading.clear()
        if mep.helper.closed.done():
            log.error("the helper connection closed; stopping", reason=str(mep.helper.closed.result()))
            code = code or EX_UNAVAILABLE
        await mep.stop(config.mu_child_ep_grace_period_s)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self.heartbeat.final()
        self.admin.close()
        if mep.audit is not None:
            mep.audit.close()
        mep.helper.close()
        log.info("broker stopped", code=code)
        return code

    async def reregister(self) -> bool:
        """Register again (same id, new AMQP credentials), with backoff; False if a stop
        came meanwhile or the registration cannot be used."""
        mep, log = self.mep, self.log
        mep.reregister.clear()
        # a service that keeps handing out refused credentials must not get a tight loop
        recent = time.monotonic() - self._reregistered_at < REREGISTER_CALM_S
        self._reregistrations = self._reregistrations + 1 if recent else 1
        delay = registration_mod.first_delay(self._reregistrations - 1) if self._reregistrations > 1 else 0
        log.warning("RabbitMQ refused the MEP's AMQP credentials; registering again for new ones", wait_s=delay)
        if delay:
            try:
                await asyncio.wait_for(mep.stopping.wait(), delay)
                return False
            except asyncio.TimeoutError:
                pass
        self._reregistered_at = time.monotonic()
        try:
            registration = await registration_mod.obtain_retrying(self.setup.config, log, mep.stopping)
        except SETUP_ERRORS as e:
            log.error("cannot register again; stopping", error=f"({type(e).__name__}) {e}")
            return False
        if registration is None:
            return False
        if str(registration["endpoint_id"]) != mep.endpoint_id:
            log.error("the service gave another endpoint id; stopping", expected=mep.endpoint_id,
                      received=str(registration["endpoint_id"]))
            return False
        mep.registration = self.heartbeat.registration = registration
        self.setup = attrs.evolve(self.setup, registration=registration)
        return True

    async def restart_in_place(self, background: list) -> None:
        """Exec a fresh broker image (same pid); returns only if that could not happen."""
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self.admin.close()
        if not await self.mep.quiesce(QUIESCE_S):
            self.log.error("reload postponed: helper requests still in flight; serving on with the running image",
                           waited_s=QUIESCE_S)
            background[:] = await self._start_background(resumed=True)
            return
        state_fd, keep = reexec.save(self.mep)  # no await between quiesce() and exec
        keep += lock.pass_on(self.lock_fd)
        self.log.info("re-executing the broker", pid=os.getpid(), user_endpoints=len(self.mep.uep))
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            reexec.exec_self(state_fd, keep)
        except OSError as e:
            os.environ.pop(lock.RESUME_ENV, None)
            self.log.error("re-exec failed; serving on with the running image", error=str(e))
        background[:] = await self._start_background(resumed=True)

    async def _start_background(self, resumed: bool) -> list:
        try:
            await self.admin.start()
        except (AdminError, OSError) as e:
            self.log.error("no admin socket; mepctl cannot reach this broker (it serves users regardless)",
                           error=str(e))
        background = [asyncio.ensure_future(self.mep.idmap.watch()), asyncio.ensure_future(self.heartbeat.run())]
        if not resumed and (sys.stderr.isatty() or self.args.log_to_console):
            print(console.banner(self.mep.endpoint_id, self.args.log_to_console), file=sys.stderr)
        if sys.stderr.isatty():
            background.append(asyncio.ensure_future(console.run_timer(sys.stderr, self.mep)))
        return background


def main(argv=None) -> int:
    return asyncio.run(run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
