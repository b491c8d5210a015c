"""The multi-user endpoint: start-UEP commands in, user endpoint processes out.

One command's path: parse and check it (commands.py) -> map the identity set to a local
account (idmap.py) -> render the admin's template for that account (templates.py) ->
ask the root helper to spawn the UEP (helper_client.py) -> hand it its credentials.
Every refusal on the way becomes a failure notice to the user and a log line for the
admin. The AMQP message is acknowledged only once its outcome is known, so a broker that
dies mid-command leaves the command to be redelivered to the next one.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import pwd
import time
import uuid

import aio_pika
import attrs
import aiormq.exceptions
import yaml
from cryptography.fernet import Fernet

from broker import commands, limits, notices, registration as registration_mod, templates
from broker.config import MEPConfig
from broker.helper_client import HelperClient, HelperGone, HelperRefused, InvalidRequest
from broker.idmap import IdentityMapper
from broker.journal import MAX_BEGUN, Journal, digest
from broker.registry import UEP, Registry, stdin_document
from broker.batch_cleanup import BatchCleanup

PREFETCH = 16  # commands in flight at once; each holds at most one helper request
EARLY_EXIT_S = 60  # a UEP that fails within this time of its start gets its user a notice
RECONNECT_FIRST_S, RECONNECT_MAX_S = 1.0, 16.0  # AMQP reconnect backoff: 1, 2, 4, 8, 16, 16 ... s between attempts
STOPPED = ("The multi-user endpoint is shutting down and stopped this user endpoint; tasks not yet finished will not "
           "run. Submit them again once the endpoint is back, or contact its administrator.")


def reconnect_delay(failures: int) -> float:
    """Seconds before the next AMQP connection attempt after `failures` in a row."""
    return min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** max(0, failures - 1))


class Refusal(Exception):
    """A start that will not happen: `user_message` goes to the user, `detail` to the log."""

    def __init__(self, user_message: str, detail: str | None = None, **log_fields):
        super().__init__(detail or user_message)
        self.user_message, self.log_fields = user_message, log_fields


ENV_BROKEN = "the endpoint's user environment file is broken; contact the endpoint administrator"


def load_user_environment(path) -> dict:
    """user_environment.yaml: flat `NAME: value` pairs for every UEP's environment, each
    within the helper's limits (a name such as MY-VAR would otherwise reach the helper)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as e:
        raise Refusal(ENV_BROKEN, f"{path}: {e}") from None
    if not isinstance(data, dict) or any(isinstance(v, (dict, list)) for v in data.values()):
        raise Refusal(ENV_BROKEN, f"{path}: must be flat `NAME: value` pairs")
    env = {str(k): "" if v is None else str(v) for k, v in data.items()}
    try:
        return limits.environment(env, path.name)
    except limits.LimitBroken as e:
        raise Refusal(f"{ENV_BROKEN} ({e})", str(e), file=str(path)) from None


def runtime_environment(cmd: commands.StartCommand) -> dict:
    """What the UEP is told of the user's runtime, each value checked where it enters."""
    python, env = cmd.user_runtime.get("python"), {}  # a dict: render() refused anything else
    for name, label, value in (
            ("GC_USER_PYTHON_VERSION", "user_runtime.python.version", python.get("version") if isinstance(python, dict) else None),
            ("GC_USER_SDK_VERSION", "user_runtime.globus_compute_sdk_version", cmd.user_runtime.get("globus_compute_sdk_version"))):
        if isinstance(value, str):
            env[name] = limits.env_value(label, value)
    return env


class MEP:
    def __init__(self, config: MEPConfig, registration: dict, helper: HelperClient, idmap: IdentityMapper, log,
                 audit=None):
        self.config, self.registration, self.helper, self.idmap, self.log = config, registration, helper, idmap, log
        self.audit = audit  # an AuditLog for a high-assurance MEP with audit_log_path
        self.endpoint_id = str(registration["endpoint_id"])
        self.uep = Registry()
        self._locks: dict[str, tuple[asyncio.Lock, list]] = {}  # UEP name -> (lock, [users]); dropped when unused
        self._tasks: set[asyncio.Task] = set()
        self._in_hand = 0  # commands being served
        self._served: set[asyncio.Task] = set()  # see on_message
        self.stopping, self.reloading = asyncio.Event(), asyncio.Event()
        self.reregister = asyncio.Event()  # RabbitMQ refused the account: serve() returns for a new registration
        self.draining = False
        self.amqp = None  # the robust connection while serving
        self.amqp_lost_at, self.amqp_failures = None, 0  # while it reconnects: since when, attempts failed
        self.started = time.time()
        self.journal = Journal(config.conf_dir / "run" / "inflight.json", log)
        helper.on_exit = self.on_exit
        self.batch = BatchCleanup(helper, log, lambda: load_user_environment(self.config.user_environment_path))

    # -- AMQP ------------------------------------------------------------------------

    async def serve(self) -> str:
        """Consume commands until a stop, a reload or the loss of the helper; returns
        "stop", "reload", "helper-gone", "duplicate" (another MEP consumes the queue) or
        "reregister" (RabbitMQ refused the credentials: retrying the same URL never helps).
        Commands in hand are finished first; commands
        delivered but not begun stay unacked and go back to the queue."""
        info = self.registration["command_queue_info"]
        self.draining = False
        try:
            connection = await aio_pika.connect_robust(info["connection_url"], reconnect_interval=RECONNECT_FIRST_S,
                                                       client_properties={  # what rabbitmqctl shows
                                                           "connection_name": f"mep-broker {self.config.name} pid {os.getpid()}"})
        except Exception as e:
            if registration_mod.amqp_credentials_refused(e):
                return "reregister"
            raise

        def lost(_connection, exc) -> None:  # the loss, then each failed attempt
            if exc is None or self.draining:
                return
            if registration_mod.amqp_credentials_refused(exc):
                self.reregister.set()
            self.amqp_failures += 1
            self.amqp_lost_at = self.amqp_lost_at or time.time()
            connection.reconnect_interval = reconnect_delay(self.amqp_failures)  # aio-pika reads it before each wait
            self.log.warning("AMQP connection lost; reconnecting", error=f"({type(exc).__name__}) {exc}",
                             failures=self.amqp_failures, retry_in_s=connection.reconnect_interval)

        def back(*_) -> None:
            self.log.warning("AMQP connection re-established", failed_attempts=self.amqp_failures,
                             down_s=round(time.time() - (self.amqp_lost_at or time.time()), 1))
            self.amqp_lost_at, self.amqp_failures, connection.reconnect_interval = None, 0, RECONNECT_FIRST_S
        connection.reconnect_callbacks.add(back)
        connection.close_callbacks.add(lost)
        self.amqp = connection
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=PREFETCH)
            queue = await channel.declare_queue(info["queue"], passive=True)
            try:  # exclusive: a second MEP of the same registration is refused, not served alongside
                tag = await queue.consume(self.on_message, exclusive=True)
            except aiormq.exceptions.ChannelAccessRefused as e:
                self.log.error("another MEP is consuming this endpoint's command queue (the same registration, "
                               "started from another directory or host); this one stops", queue=info["queue"],
                               endpoint_id=self.endpoint_id, error=str(e))
                self.amqp = None
                return "duplicate"
            self.log.info("consuming start commands", queue=info["queue"], endpoint_id=self.endpoint_id)
            waits = {asyncio.ensure_future(self.stopping.wait()): "stop",
                     asyncio.ensure_future(self.reloading.wait()): "reload", self.helper.closed: "helper-gone",
                     asyncio.ensure_future(self.reregister.wait()): "reregister"}
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            reason = waits[done.pop()]
            self.draining = True
            for waiter in waits:
                if waiter is not self.helper.closed:
                    waiter.cancel()
            if not self.helper.closed.done():
                if reason != "reregister":  # (then there is no channel to cancel on)
                    await queue.cancel(tag)
                while self._in_hand:
                    await asyncio.sleep(0.01)
        self.amqp = None
        return reason

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """aiormq cancels its consumer tasks when the channel closes; a start that is
        already with the helper must still be recorded, so the work runs in a task of
        our own that the channel's loss cannot cancel."""
        if self.draining:
            return  # not begun, not acked: closing the channel requeues it
        task = asyncio.ensure_future(self._serve_message(message))
        self._served.add(task)
        task.add_done_callback(self._served.discard)
        await asyncio.shield(task)

    async def _serve_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._in_hand += 1
        key = digest(message.body)
        try:
            ts = message.timestamp.timestamp() if message.timestamp else None
            if (begun := self.journal.interrupted(key)) >= MAX_BEGUN:
                await self.refuse_interrupted(message.body, begun)
            else:
                self.journal.begin(key)
                try:
                    await self.handle(message.body, message.content_type, ts)
                except HelperGone as e:
                    # not acked: the next broker gets this command again (journal.py: once)
                    self.log.error("helper connection lost while serving a command; leaving it for redelivery",
                                   error=str(e), times_begun=begun + 1)
                    return
            self.journal.end(key)
            try:
                await message.ack()
            except Exception as e:  # noqa: BLE001 - the channel went with the connection
                self.log.warning("command served but not acknowledged (AMQP connection lost); RabbitMQ will deliver "
                                 "it again and its user endpoint will be found running", error=f"({type(e).__name__}) {e}")
        finally:
            self._in_hand -= 1

    async def quiesce(self, timeout: float) -> bool:
        """Wait until no replayed start and no helper request is in flight (before a
        re-exec); False if that did not happen within `timeout` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._tasks or not self.helper.idle:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    # -- one command -----------------------------------------------------------------

    async def handle(self, body: bytes, content_type, timestamp) -> None:
        """Serve one command; whatever goes wrong, its user hears of it and the broker goes on."""
        kwargs, who = {}, "(unparsed command)"
        try:
            try:
                cmd = commands.parse(body, content_type, timestamp)
            except commands.CommandRejected as e:
                self.log.error("start command refused", reason=e.log_detail)
                return await self.notify(e.kwargs, str(e), who=who)
            kwargs, who = cmd.kwargs, cmd.effective_identity
            await self.serve_start(cmd)
        except (HelperGone, asyncio.CancelledError):
            raise
        except Exception:  # noqa: BLE001 - the broker must outlive any one command
            reference = uuid.uuid4().hex[:12]
            self.log.exception("unexpected error while serving a start command; its user was sent a notice with "
                               "this reference", reference=reference, who=who)
            await self.notify(kwargs, notices.unexpected(reference), who=who)

    async def refuse_interrupted(self, body: bytes, begun: int) -> None:
        """A command whose handling was cut short `begun` times (journal.py): refused, not tried again."""
        try:
            kwargs = commands.parse(body, "application/json", time.time()).kwargs
        except commands.CommandRejected as e:
            kwargs = e.kwargs  # without amqp_creds no notice can be sent, and notify() logs that
        self.log.error("start command refused: its handling was interrupted before (the broker or its helper "
                       "stopped during it), so it is not tried again", times_begun=begun, uep=kwargs.get("name"))
        await self.notify(kwargs, notices.INTERRUPTED, who="(interrupted command)")

    async def serve_start(self, cmd: commands.StartCommand, replayed: bool = False) -> None:
        """One start at a time per UEP name; a refusal is logged and sent to the user."""
        lock, users = self._locks.setdefault(cmd.name, (asyncio.Lock(), []))
        users.append(None)
        try:
            async with lock:
                await self.start(cmd)
        except Refusal as r:
            self.log.error("user endpoint not started", replayed=replayed, reason=str(r), **cmd.for_log(),
                           **r.log_fields)
            await self.notify(cmd.kwargs, r.user_message, who=cmd.effective_identity)
        finally:
            users.pop()
            if not users:
                del self._locks[cmd.name]

    async def notify(self, kwargs: dict, message: str, who: str) -> None:
        creds = kwargs.get("amqp_creds") if isinstance(kwargs, dict) else None
        if not isinstance(creds, dict):
            self.log.error("cannot send a failure notice: the command carries no AMQP credentials", who=who)
            return
        try:
            await notices.send_failure(creds, message)
            self.log.info("failure notice sent", who=who, uep=kwargs.get("name"))
        except Exception as e:  # noqa: BLE001
            self.log.error("failure notice could not be sent", who=who, error=f"({type(e).__name__}) {e}")

    async def start(self, cmd: commands.StartCommand) -> None:
        running = self.uep.by_name.get(cmd.name)
        account, mapped = await self.map_account(cmd)
        if running is not None:
            if running.uid != account.pw_uid:
                raise Refusal(notices.start_failed(account.pw_name, "this user endpoint id belongs to another user"),
                              f"UEP {cmd.name} runs as {running.username}, the command maps to {account.pw_name}")
            running.write_credentials(cmd.amqp_creds)
            running.replay = cmd
            self.log.info("user endpoint already running; credentials refreshed, start cached in case it is stopping",
                          pid=running.pid, user=running.username, **cmd.for_log())
            return
        if self.audit is not None and self.audit.broken:
            raise Refusal(notices.start_failed(account.pw_name, "the endpoint's audit log is unavailable; contact the "
                                               "endpoint administrator"), f"audit log broken: {self.audit.broken}")
        rendered = self.render(cmd, account, mapped)
        env = load_user_environment(self.config.user_environment_path)
        env.setdefault("GLOBUS_COMPUTE_ENDPOINT_NAME", cmd.name)
        enckey = Fernet.generate_key()
        audit = self.audit is not None
        try:
            for name, value in runtime_environment(cmd).items():
                env.setdefault(name, value)
            limits.environment(env, "the user endpoint's environment")
            stdin = limits.stdin_size(stdin_document(
                amqp_creds=cmd.amqp_creds, config_text=rendered.text, posix_ppid=os.getpid(),
                candidates=mapped.candidates, matched_identity=mapped.identity, enckey=enckey,
                allowed_functions=self.config.allowed_functions, audit=audit),
                "the rendered user endpoint configuration with its credentials")
            result = await self.helper.spawn(account.pw_name, account.pw_uid, cmd.name, env, stdin,
                                             ("cred", "audit") if audit else ("cred",))
        except (limits.LimitBroken, InvalidRequest) as e:
            raise Refusal(notices.start_failed(account.pw_name, str(e)), f"over a limit of the helper protocol: {e}",
                          user=account.pw_name) from None
        except HelperRefused as e:
            raise Refusal(notices.start_failed(account.pw_name, f"({e.code}) {e.reason}; see your system administrator"),
                          f"helper refused: ({e.code}) {e.reason}", user=account.pw_name) from None
        uep = UEP(name=cmd.name, username=account.pw_name, uid=account.pw_uid, pid=result.pid,
                  endpoint_id=cmd.endpoint_id, identity=mapped.identity, enckey=enckey,
                  cred_fd=result.fds.get("cred"), audit_pipe=result.fds.get("audit"))
        uep.write_credentials(cmd.amqp_creds)
        if uep.audit_pipe is not None:
            self.audit.watch(uep.audit_pipe, uep)
        self.uep.add(uep)
        self.batch.watch(uep, rendered.config)
        self.log.info(f"user endpoint started: Command process successfully forked for '{uep.username}' (Globus "
                      f"effective identity: {cmd.effective_identity}).", pid=uep.pid, user=uep.username, uid=uep.uid,
                      rule=mapped.rule, **cmd.for_log())

    async def map_account(self, cmd):
        try:  # an external mapper runs a program: keep it off the event loop
            mapped = await asyncio.to_thread(self.idmap.map, cmd.identity_set)
        except Exception as e:  # noqa: BLE001 - a mapper's own failure
            raise Refusal("Unhandled error attempting to map to a local user name.",
                          f"identity mapper failed: ({type(e).__name__}) {e}") from None
        if mapped is None:
            raise Refusal("Identity failed to map to a local user name.",
                          f"no rule of {self.idmap.path} maps any identity of the set",
                          identities=[i.get("username") for i in cmd.identity_set])
        try:
            limits.username(mapped.username)
        except limits.LimitBroken as e:
            raise Refusal(notices.start_failed(mapped.username, f"{e}; see your system administrator"),
                          f"{mapped.rule} mapped to {mapped.username!r}, a name the helper does not start: {e}") from None
        try:
            account = pwd.getpwnam(mapped.username)
        except KeyError:
            raise Refusal(f"Identity mapped to a local user name, but local user does not exist. "
                          f"Local user name: {mapped.username}",
                          f"{mapped.rule} mapped to {mapped.username!r}, which has no passwd entry") from None
        if account.pw_uid == os.getuid():
            raise Refusal(notices.start_failed(account.pw_name, "the mapped user is the endpoint's own account; "
                                               "see your system administrator"),
                          f"{mapped.rule} maps to the broker's own account {account.pw_name}")
        return account, mapped

    def render(self, cmd, account, mapped) -> templates.Rendered:
        groups = os.getgrouplist(account.pw_name, account.pw_gid)
        identity = {"local": {"uname": account.pw_name, "uid": account.pw_uid, "gid": account.pw_gid,
                              "gecos": account.pw_gecos, "shell": account.pw_shell, "dir": account.pw_dir,
                              "groups": groups},
                    "globus": {"id": mapped.identity}}
        # the whole MEP config, as upstream gives its templates (`parent_config.amqp_port`, ...)
        parent = {k: str(v) if isinstance(v, pathlib.PurePath) else v
                  for k, v in attrs.asdict(self.config, recurse=True).items()} | {"multi_user": True}
        try:
            rendered = templates.render(self.config.user_config_template_path, self.config.user_config_schema_path,
                                        user_opts=cmd.user_opts, user_runtime=cmd.user_runtime,
                                        mapped_identity=identity, parent_config=parent,
                                        high_assurance=self.config.high_assurance,
                                        allowed_functions=self.config.allowed_functions)
        except templates.TemplateRefused as e:
            raise Refusal(notices.start_failed(account.pw_name, e.user_message), str(e), user=account.pw_name) from None
        for what in rendered.overrides:
            self.log.info("rendered config overridden by the MEP", what=what, uep=cmd.name)
        if rendered.config.get("debug") is True:
            self.log.info("\n".join(templates.debug_lines(rendered.text)), uep=cmd.name, user=account.pw_name)
        return rendered

    # -- exits and stopping ----------------------------------------------------------

    def on_exit(self, pid: int, status: int) -> None:
        uep = self.uep.remove(pid)
        if uep is None:
            if not self.batch.on_exit(pid, status):  # a batch job cleanup (broker/batch_cleanup.py)?
                self.log.warning("exit of an unknown process", pid=pid, status=status)
            return
        uep.close_cred()
        if self.audit is not None and uep.audit_pipe is not None:
            self.audit.drain(uep.audit_pipe)
        how = ("Command stopped normally" if status == 0 else f"Command return code: {status}" if status > 0
               else f"Command terminated by signal: {-status}")  # upstream's words
        (self.log.info if status == 0 else self.log.warning)(
            f"user endpoint exited: {how} ({pid}) [({uep.username}, {uep.name})]", pid=pid, status=status, user=uep.username,
            uep=uep.name, uptime_s=round(uep.uptime(), 1))
        self.batch.uep_exited(uep)  # cancel the batch jobs it left, as its user
        if status != 0 and uep.uptime() < EARLY_EXIT_S and uep.amqp_creds and not self.stopping.is_set():
            # it died before it could serve (a broken launcher, PATH, or config): its user must hear of it
            self._spawn_task(self.notify({"amqp_creds": uep.amqp_creds, "name": uep.name}, notices.start_failed(
                uep.username, f"the user endpoint process ended {uep.uptime():.0f} s after it started ({how}); its "
                f"log is ~/.globus_compute/{uep.name}/endpoint.log on the endpoint's host"), who=uep.username))
        if uep.replay is not None and not self.stopping.is_set():
            self.log.info("replaying the start that arrived while it was running", uep=uep.name)
            self._spawn_task(self.serve_start(uep.replay, replayed=True))

    def _spawn_task(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop_uep(self, uep: UEP, sig: str = "TERM") -> None:
        try:
            await self.helper.signal(uep.pid, sig)
        except HelperRefused as e:  # it exited meanwhile
            self.log.info("signal not delivered", pid=uep.pid, reason=e.reason)

    async def stop(self, grace: float) -> None:
        """Stop consuming, tell each UEP's user, TERM every UEP, wait up to `grace`, then
        let the helper KILL the rest."""
        self.stopping.set()
        ueps = list(self.uep)
        await asyncio.gather(*(self.notify({"amqp_creds": u.amqp_creds, "name": u.name}, STOPPED, who=u.username)
                               for u in ueps if u.amqp_creds))
        for uep in ueps:
            try:
                await self.stop_uep(uep)
            except HelperGone:
                break
        deadline = asyncio.get_running_loop().time() + grace
        while len(self.uep) and asyncio.get_running_loop().time() < deadline and not self.helper.closed.done():
            await asyncio.sleep(0.05)
        await self.batch.finish(self)  # KILL the rest, so their batch jobs are cancelled before the helper goes
        for task in list(self._tasks):
            task.cancel()
