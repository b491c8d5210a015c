"""The multi-user endpoint: start-UEP commands in, user endpoint processes out.

The MEP is three objects wired together (broker/pipeline.py reads top to bottom):
the AMQP consumer (broker/intake.py) hands each command to the pipeline, whose stages
(mapping, rendering, spawning) turn it into a running UEP in the fleet (broker/fleet.py).
This class owns their lifetimes and is what the process around it (broker/main.py), the
admin socket (broker/admin.py) and a re-exec (broker/reexec.py) talk to.
"""

from __future__ import annotations

import asyncio
import time

from broker import layout
from broker.batch_cleanup import BatchCleanup
from broker.config import MEPConfig
from broker.fleet import EARLY_EXIT_S, STOPPED, Fleet  # noqa: F401 - the MEP's constants, named here too
from broker.helper_client import HelperClient
from broker.idmap import IdentityMapper
from broker.intake import PREFETCH, RECONNECT_FIRST_S, RECONNECT_MAX_S, Consumer, reconnect_delay  # noqa: F401
from broker.journal import Journal
from broker.pipeline import Pipeline
from broker.registry import UEP
from broker.spawning import load_user_environment


class MEP:
    def __init__(self, config: MEPConfig, registration: dict, helper: HelperClient, idmap: IdentityMapper, log,
                 audit=None):
        self.config, self.registration, self.helper, self.idmap, self.log = config, registration, helper, idmap, log
        self.audit = audit  # an AuditLog for a high-assurance MEP with audit_log_path
        self.endpoint_id = str(registration["endpoint_id"])
        self.started = time.time()
        self.pipeline = Pipeline(config, helper, idmap, log, audit)
        self.consumer = Consumer(config.name, self.endpoint_id, helper, Journal(layout.journal_file(config.conf_dir), log),
                                 self.pipeline, log)
        self.stopping, self.reloading, self.reregister = (self.consumer.stopping, self.consumer.reloading,
                                                          self.consumer.reregister)
        self.batch = BatchCleanup(helper, log, lambda: load_user_environment(self.config.user_environment_path))
        self.fleet = Fleet(helper, log, audit, self.batch, self.stopping, self.pipeline.notify, self.pipeline.start)
        self.pipeline.fleet = self.fleet
        self.uep = self.fleet.ueps  # the registry of running UEPs
        helper.on_exit = self.fleet.on_exit
        self._fleet_task = asyncio.ensure_future(self.fleet.run())  # until stop(): exits may come before serve()

    # what the admin socket reports of the AMQP connection
    amqp = property(lambda self: self.consumer.amqp)
    amqp_lost_at = property(lambda self: self.consumer.amqp_lost_at)
    amqp_failures = property(lambda self: self.consumer.amqp_failures)

    async def serve(self) -> str:
        """Consume until a stop, a reload, the helper's loss, a duplicate or a refused
        account (broker/intake.py says which string)."""
        return await self.consumer.consume(self.registration["command_queue_info"])

    async def quiesce(self, timeout: float) -> bool:
        """Wait until no replayed start and no helper request is in flight (before a
        re-exec); False if that did not happen within `timeout` seconds. On True both are
        idle at once, and the caller may exec before its next await."""
        idle = (self.fleet.idle, self.helper.idle)
        try:
            async with asyncio.timeout(timeout):  # not wait_for, whose task puts a turn of the loop before the caller
                while not all(event.is_set() for event in idle):  # one may be cleared while the other is awaited
                    for event in idle:
                        await event.wait()
        except TimeoutError:
            return False
        return True

    async def stop_uep(self, uep: UEP, sig: str = "TERM") -> None:
        await self.fleet.stop_uep(uep, sig)

    async def stop(self, grace: float) -> None:
        """Stop consuming, tell each UEP's user, TERM every UEP, wait up to `grace`, then
        let the helper KILL the rest; the fleet's remaining work is cancelled."""
        self.stopping.set()
        await self.fleet.stop(grace, self)
        await self._fleet_task
