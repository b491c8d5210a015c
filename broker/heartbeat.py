"""The MEP's heartbeats: an EPStatusReport to the registration's heartbeat_queue_info every
`heartbeat_period` seconds, and a last one (period 0: "shutting down now") at stop.

Exactly upstream's (CoreEndpoint.send_heartbeat, 4.19): globus-compute-common's
messagepack of EPStatusReport(endpoint_id, global_state={"heartbeat_period": P},
task_statuses={}), published with the registration's queue_publish_kwargs, the period
at least 5 s (upstream's MINIMUM_HEARTBEAT). The web service shows the endpoint online
while they come. A heartbeat that cannot be sent is logged and the next one tries a new
connection; it never stops the MEP.
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
from globus_compute_common.messagepack import pack
from globus_compute_common.messagepack.message_types import EPStatusReport

MINIMUM_PERIOD_S = 5.0
TIMEOUT_S = 10.0


def period(config) -> float:
    return max(MINIMUM_PERIOD_S, float(config.heartbeat_period))


def report(endpoint_id: str, heartbeat_period: float) -> bytes:
    return pack(EPStatusReport(endpoint_id=uuid.UUID(str(endpoint_id)),
                               global_state={"heartbeat_period": heartbeat_period}, task_statuses={}))


class Heartbeat:
    def __init__(self, registration: dict, period_s: float, log):
        self.registration, self.period, self.log = registration, period_s, log
        self._connection = None
        self._channel = None
        self._failing = False

    @property
    def info(self) -> dict | None:
        return self.registration.get("heartbeat_queue_info")

    async def run(self) -> None:
        """Every period until cancelled (a reload or a stop cancels it)."""
        if self.info is None:
            self.log.info("no heartbeat_queue_info in the registration (a fixed registration.json): no heartbeats")
            return
        try:
            while True:
                await self.send(self.period)
                await asyncio.sleep(self.period)
        finally:
            await self.close()

    async def final(self) -> None:
        """The last word at stop: heartbeat_period 0."""
        if self.info is not None:
            await self.send(0)
            await self.close()

    async def send(self, heartbeat_period: float) -> bool:
        info = self.info
        publish = dict(info["queue_publish_kwargs"])
        props = dict(publish.get("properties") or {})
        try:
            if self._channel is None or self._channel.is_closed:
                await self.close()
                self._connection = await aio_pika.connect(info["connection_url"], timeout=TIMEOUT_S)
                self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = (await self._channel.get_exchange(publish["exchange"], ensure=False) if publish.get("exchange")
                        else self._channel.default_exchange)
            message = aio_pika.Message(report(self.registration["endpoint_id"], heartbeat_period),
                                       delivery_mode=props.get("delivery_mode"))
            await exchange.publish(message, routing_key=publish["routing_key"],
                                   mandatory=publish.get("mandatory", True), timeout=TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a lost heartbeat is logged, never fatal
            if not self._failing:
                self.log.error("heartbeat not sent; trying again next period", error=f"({type(e).__name__}) {e}",
                               exchange=publish.get("exchange"))
            self._failing = True
            await self.close()
            return False
        if self._failing:
            self.log.info("heartbeats are sent again")
        self._failing = False
        return True

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                await connection.close()
            except Exception:  # noqa: BLE001
                pass
