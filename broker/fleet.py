"""Stage 5 of a start (broker/pipeline.py): the fleet of running UEPs, until each exits.

The fleet holds the registry of running UEPs (broker/registry.py), hears each exit from
the helper, tells the user of a UEP that died early, replays a start that arrived while
its UEP was running (upstream's behaviour), and stops every UEP when the broker stops.
Work started by an exit (a notice, a replay) runs in the fleet's TaskGroup, which lives
as long as the broker serves (`run`) and cancels what is left when it stops.
"""

from __future__ import annotations

import asyncio

from broker import notices
from broker.helper_client import HelperClient, HelperGone, HelperRefused
from broker.registry import UEP, Registry

EARLY_EXIT_S = 60  # a UEP that fails within this time of its start gets its user a notice
STOPPED = ("The multi-user endpoint is shutting down and stopped this user endpoint; tasks not yet finished will not "
           "run. Submit them again once the endpoint is back, or contact its administrator.")


class _Closed(Exception):
    """Raised in the fleet's TaskGroup to cancel the work still in it."""


class Fleet:
    def __init__(self, helper: HelperClient, log, audit, batch, stopping: asyncio.Event, notify, replay):
        self.helper, self.log, self.audit, self.batch, self.stopping = helper, log, audit, batch, stopping
        self.notify, self.replay = notify, replay  # the pipeline's: (kwargs, message, who), (command, replayed=)
        self.ueps = Registry()
        self._group: asyncio.TaskGroup | None = None
        self._closing = asyncio.Event()
        self._busy = 0  # tasks in the group; `idle` is set when there are none
        self.idle = asyncio.Event()
        self.idle.set()
        self._empty = asyncio.Event()  # set by the exit that leaves no UEP running (see stop)

    async def run(self) -> None:
        """The fleet's lifetime: returns once close() is called, its tasks cancelled."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                await self._closing.wait()
                raise _Closed
        except* _Closed:
            pass
        finally:
            self._group = None

    def close(self) -> None:
        self._closing.set()

    def _start(self, coro) -> None:
        if self._group is None:  # not running (the broker is stopping): nothing more to do
            coro.close()
            return
        self._busy += 1
        self.idle.clear()
        self._group.create_task(self._guarded(coro))

    async def _guarded(self, coro) -> None:
        """One task's failure must not cancel the others (a TaskGroup would)."""
        try:
            await coro
        except HelperGone:
            pass
        except Exception:  # noqa: BLE001 - logged, the fleet goes on
            self.log.exception("a user endpoint's follow-up failed")
        finally:
            self._busy -= 1
            if not self._busy:
                self.idle.set()

    def add(self, uep: UEP, rendered_config: dict) -> None:
        if uep.audit_pipe is not None:
            self.audit.watch(uep.audit_pipe, uep)
        self.ueps.add(uep)
        self.batch.watch(uep, rendered_config)

    def on_exit(self, pid: int, status: int) -> None:
        """The helper's `exited` event (called from its reader)."""
        uep = self.ueps.remove(pid)
        if not len(self.ueps):
            self._empty.set()
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
            self._start(self.notify({"amqp_creds": uep.amqp_creds, "name": uep.name}, notices.start_failed(
                uep.username, f"the user endpoint process ended {uep.uptime():.0f} s after it started ({how}); its "
                f"log is ~/.globus_compute/{uep.name}/endpoint.log on the endpoint's host"), who=uep.username))
        if uep.replay is not None and not self.stopping.is_set():
            self.log.info("replaying the start that arrived while it was running", uep=uep.name)
            self._start(self.replay(uep.replay, replayed=True))

    async def stop_uep(self, uep: UEP, sig: str = "TERM") -> None:
        try:
            await self.helper.signal(uep.pid, sig)
        except HelperRefused as e:  # it exited meanwhile
            self.log.info("signal not delivered", pid=uep.pid, reason=e.reason)

    async def stop(self, grace: float, owner) -> None:
        """Tell each UEP's user, TERM every UEP, wait up to `grace` for their exits, then
        let the helper KILL the rest (batch jobs are cancelled first: broker/batch_cleanup.py)."""
        ueps = list(self.ueps)
        await asyncio.gather(*(self.notify({"amqp_creds": u.amqp_creds, "name": u.name}, STOPPED, who=u.username)
                               for u in ueps if u.amqp_creds))
        for uep in ueps:
            try:
                await self.stop_uep(uep)
            except HelperGone:
                break
        if len(self.ueps) and not self.helper.closed.done():
            self._empty.clear()
            exits = asyncio.ensure_future(self._empty.wait())
            await asyncio.wait([exits, self.helper.closed], timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            exits.cancel()
        await self.batch.finish(owner)  # KILL the rest, so their batch jobs are cancelled before the helper goes
        self.close()
