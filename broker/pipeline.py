"""One start command, top to bottom: the broker's pipeline.

    intake    broker/intake.py     AMQP delivery, journal, ack  -> body
              broker/commands.py   parse and check               -> StartCommand
    mapping   broker/mapping.py    identity set -> local account -> Account
    rendering broker/rendering.py  template, schema, options     -> Rendered
    spawning  broker/spawning.py   environment, stdin, helper    -> UEP
    fleet     broker/fleet.py      running UEPs, exits, replays, stop

Each stage takes the previous one's value and returns the next, or raises the one
refusal type (broker/refusal.py); `Pipeline.serve` turns a refusal into the user's
failure notice and the admin's log line, and an unforeseen error into both with a
reference, so that the broker outlives any one command.
"""

from __future__ import annotations

import asyncio
import uuid

from broker import commands, mapping, notices, rendering, spawning
from broker.config import MEPConfig
from broker.fleet import Fleet
from broker.helper_client import HelperClient, HelperGone
from broker.idmap import IdentityMapper
from broker.refusal import Refused


# Each notice is its own AMQP connection, with that UEP's credentials. A stop with 1,000 live
# UEPs sends 1,000 at once; unbounded, they were 1,000 connections at once, past a default
# RabbitMQ's 1,024 file descriptors (its memory monitor died of EMFILE): this many at a time.
NOTICE_CONNECTIONS = 32


class Pipeline:
    def __init__(self, config: MEPConfig, helper: HelperClient, idmap: IdentityMapper, log, audit):
        self.config, self.helper, self.idmap, self.log, self.audit = config, helper, idmap, log, audit
        self._notice_slots = asyncio.Semaphore(NOTICE_CONNECTIONS)
        self.fleet: Fleet | None = None  # set by the MEP (broker/mep.py): the fleet replays through this pipeline
        self._locks: dict[str, tuple[asyncio.Lock, list]] = {}  # UEP name -> (lock, [users]); dropped when unused

    async def serve(self, body: bytes, content_type, timestamp) -> None:
        """Serve one command's body; whatever goes wrong, its user hears of it and the broker goes on."""
        kwargs, who = {}, "(unparsed command)"
        try:
            try:
                cmd = commands.parse(body, content_type, timestamp)
            except Refused as e:
                self.log.error("start command refused", **e.for_log())
                return await self.notify(e.kwargs, e.user_message, who=who)
            kwargs, who = cmd.kwargs, cmd.effective_identity
            await self.start(cmd)
        except (HelperGone, asyncio.CancelledError):
            raise
        except Exception:  # noqa: BLE001 - the broker must outlive any one command
            reference = uuid.uuid4().hex[:12]
            self.log.exception("unexpected error while serving a start command; its user was sent a notice with "
                               "this reference", reference=reference, who=who)
            await self.notify(kwargs, notices.unexpected(reference), who=who)

    async def start(self, cmd: commands.StartCommand, replayed: bool = False) -> None:
        """One start at a time per UEP name; a refusal is logged and sent to the user."""
        lock, users = self._locks.setdefault(cmd.name, (asyncio.Lock(), []))
        users.append(None)
        try:
            async with lock:
                await self._stages(cmd)
        except Refused as r:
            self.log.error("user endpoint not started", replayed=replayed, **r.for_log(), **cmd.for_log())
            await self.notify(cmd.kwargs, r.user_message, who=cmd.effective_identity)
        finally:
            users.pop()
            if not users:
                del self._locks[cmd.name]

    async def _stages(self, cmd: commands.StartCommand) -> None:
        running = self.fleet.ueps.by_name.get(cmd.name)
        account = await mapping.account_for(self.idmap, cmd.identity_set)
        if running is not None:
            if running.uid != account.uid:
                raise Refused(notices.start_failed(account.username, "this user endpoint id belongs to another user"),
                              f"UEP {cmd.name} runs as {running.username}, the command maps to {account.username}")
            running.write_credentials(cmd.amqp_creds)
            running.replay = cmd
            self.log.info("user endpoint already running; credentials refreshed, start cached in case it is stopping",
                          pid=running.pid, user=running.username, **cmd.for_log())
            return
        if self.audit is not None and self.audit.broken:
            raise Refused(notices.start_failed(account.username, "the endpoint's audit log is unavailable; contact the "
                                               "endpoint administrator"), f"audit log broken: {self.audit.broken}")
        rendered = rendering.render(self.config, account, cmd.user_opts, cmd.user_runtime, self.log, cmd.name)
        uep = await spawning.spawn(self.helper, self.config, cmd, account, rendered, audit=self.audit is not None)
        self.fleet.add(uep, rendered.config)
        self.log.info(f"user endpoint started: Command process successfully forked for '{uep.username}' (Globus "
                      f"effective identity: {cmd.effective_identity}).", pid=uep.pid, user=uep.username, uid=uep.uid,
                      rule=account.mapped.rule, **cmd.for_log())

    async def refuse_interrupted(self, body: bytes, begun: int, now: float) -> None:
        """A command whose handling was cut short `begun` times (broker/journal.py): refused, not tried again."""
        try:
            kwargs = commands.parse(body, "application/json", now).kwargs
        except Refused as e:
            kwargs = e.kwargs  # without amqp_creds no notice can be sent, and notify() logs that
        self.log.error("start command refused: its handling was interrupted before (the broker or its helper "
                       "stopped during it), so it is not tried again", times_begun=begun, uep=kwargs.get("name"))
        await self.notify(kwargs, notices.INTERRUPTED, who="(interrupted command)")

    async def notify(self, kwargs: dict, message: str, who: str) -> None:
        """A failure notice to the command's user, with the UEP's own AMQP credentials."""
        creds = kwargs.get("amqp_creds") if isinstance(kwargs, dict) else None
        if not isinstance(creds, dict):
            self.log.error("cannot send a failure notice: the command carries no AMQP credentials", who=who)
            return
        try:
            async with self._notice_slots:
                await notices.send_failure(creds, message)
            self.log.info("failure notice sent", who=who, uep=kwargs.get("name"))
        except Exception as e:  # noqa: BLE001
            self.log.error("failure notice could not be sent", who=who, error=f"({type(e).__name__}) {e}")
