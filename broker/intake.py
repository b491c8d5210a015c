"""Stage 1 of a start (broker/pipeline.py): start commands from the service's AMQP queue.

The consumer holds the one connection to the command queue (exclusive: a second MEP of
the same registration is refused), hands each delivery's body to the pipeline, and acks
it only once its outcome is known, so a broker that dies mid-command leaves the command
to be redelivered to the next one; the journal (broker/journal.py) makes that happen
once, not forever. Each delivery is served in a task of the consumer's TaskGroup, which
lives as long as the connection: leaving it is waiting for the commands in hand.
"""

from __future__ import annotations

import asyncio
import os
import time

import aio_pika
import aiormq.exceptions

from broker import registration as registration_mod
from broker.helper_client import HelperClient, HelperGone
from broker.journal import MAX_BEGUN, Journal, digest

PREFETCH = 16  # commands in flight at once; each holds at most one helper request
RECONNECT_FIRST_S, RECONNECT_MAX_S = 1.0, 16.0  # AMQP reconnect backoff: 1, 2, 4, 8, 16, 16 ... s between attempts


def reconnect_delay(failures: int) -> float:
    """Seconds before the next AMQP connection attempt after `failures` in a row."""
    return min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** max(0, failures - 1))


class Consumer:
    def __init__(self, name: str, endpoint_id: str, helper: HelperClient, journal: Journal, pipeline, log):
        self.name, self.endpoint_id, self.helper, self.journal, self.pipeline, self.log = (
            name, endpoint_id, helper, journal, pipeline, log)
        self.stopping, self.reloading = asyncio.Event(), asyncio.Event()
        self.reregister = asyncio.Event()  # RabbitMQ refused the account: consume() returns for a new registration
        self.draining = False
        self.amqp = None  # the robust connection while consuming
        self.amqp_lost_at, self.amqp_failures = None, 0  # while it reconnects: since when, attempts failed
        self._group: asyncio.TaskGroup | None = None

    async def consume(self, queue_info: dict) -> str:
        """Consume commands until a stop, a reload or the loss of the helper; returns
        "stop", "reload", "helper-gone", "duplicate" (another MEP consumes the queue) or
        "reregister" (RabbitMQ refused the credentials: retrying the same URL never helps).
        Commands in hand are finished first; commands delivered but not begun stay unacked
        and go back to the queue."""
        self.draining = False
        try:
            connection = await aio_pika.connect_robust(queue_info["connection_url"], reconnect_interval=RECONNECT_FIRST_S,
                                                       client_properties={  # what rabbitmqctl shows
                                                           "connection_name": f"mep-broker {self.name} pid {os.getpid()}"})
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
        try:
            async with connection:
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=PREFETCH)
                queue = await channel.declare_queue(queue_info["queue"], passive=True)
                async with asyncio.TaskGroup() as group:  # its end waits for the commands in hand
                    self._group = group
                    try:  # exclusive: a second MEP of the same registration is refused, not served alongside
                        tag = await queue.consume(self.on_message, exclusive=True)
                    except aiormq.exceptions.ChannelAccessRefused as e:
                        self.log.error("another MEP is consuming this endpoint's command queue (the same "
                                       "registration, started from another directory or host); this one stops",
                                       queue=queue_info["queue"], endpoint_id=self.endpoint_id, error=str(e))
                        return "duplicate"
                    self.log.info("consuming start commands", queue=queue_info["queue"], endpoint_id=self.endpoint_id)
                    reason = await self._until_done()
                    self.draining = True
                    if not self.helper.closed.done() and reason != "reregister":  # (then no channel to cancel on)
                        try:  # an error here must not cancel the commands in hand (the group would)
                            await queue.cancel(tag)
                        except Exception as e:  # noqa: BLE001 - the connection is going anyway
                            self.log.warning("could not cancel the consumer", error=f"({type(e).__name__}) {e}")
            return reason
        finally:
            self._group, self.amqp = None, None

    async def _until_done(self) -> str:
        waits = {asyncio.ensure_future(self.stopping.wait()): "stop",
                 asyncio.ensure_future(self.reloading.wait()): "reload", self.helper.closed: "helper-gone",
                 asyncio.ensure_future(self.reregister.wait()): "reregister"}
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waits:
            if waiter is not self.helper.closed:
                waiter.cancel()
        return waits[done.pop()]

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """aiormq cancels its consumer tasks when the channel closes; a start that is
        already with the helper must still be recorded, so the work runs in a task of
        the consumer's own group that the channel's loss cannot cancel."""
        if self.draining or self._group is None:
            return  # not begun, not acked: closing the channel requeues it
        await asyncio.shield(self._group.create_task(self._deliver(message)))

    async def _deliver(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            await self._serve(message)
        except Exception:  # noqa: BLE001 - one delivery's failure must not cancel the others (the group would)
            self.log.exception("a command delivery failed; it stays unacked")

    async def _serve(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        key = digest(message.body)
        ts = message.timestamp.timestamp() if message.timestamp else None
        if (begun := self.journal.interrupted(key)) >= MAX_BEGUN:
            await self.pipeline.refuse_interrupted(message.body, begun, time.time())
        else:
            self.journal.begin(key)
            try:
                await self.pipeline.serve(message.body, message.content_type, ts)
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
