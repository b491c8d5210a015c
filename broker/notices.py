"""Failure notices: tell the submitting user why their user endpoint did not start.

Upstream publishes an EPStatusReport on the UEP's heartbeat queue with the reason in
`global_state.error`; the service fails the user's futures with it. The bytes are
globus-compute-common's messagepack (protocol 1): b"\\x01" then compact JSON.
"""

from __future__ import annotations

import json

import aio_pika

GENERIC = "General or unknown failure starting user endpoint"
INTERRUPTED = (f"{GENERIC}: the endpoint stopped twice while it handled this start request, so it is not tried "
               "again; submit again, and if it fails the same way contact the endpoint's administrator")


def unexpected(reference: str) -> str:
    """For an error no rule foresaw: the details are in the admin's log under `reference`."""
    return (f"{GENERIC}: the endpoint could not start your user endpoint; the administrator's log has the details, "
            f"reference {reference}")


def status_report(endpoint_id: str, message: str) -> bytes:
    body = {"message_type": "ep_status_report",
            "data": {"endpoint_id": str(endpoint_id), "global_state": {"error": message, "heartbeat_period": 3},
                     "task_statuses": {}}}
    return b"\x01" + json.dumps(body, separators=(",", ":")).encode()


def start_failed(username: str, reason: str) -> str:
    """The seed's style: `Unable to start user endpoint process for jessica [...]`."""
    return f"Unable to start user endpoint process for {username} [{reason}]"


async def send_failure(amqp_creds: dict, message: str, timeout: float = 10.0) -> None:
    """Publish the notice with the UEP's own credentials (mandatory, so an unroutable
    notice is an error in our log rather than silence). Raises on any failure."""
    info = amqp_creds["heartbeat_queue_info"]
    publish = info["queue_publish_kwargs"]
    connection = await aio_pika.connect(info["connection_url"], timeout=timeout)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = (await channel.get_exchange(publish["exchange"], ensure=False) if publish.get("exchange")
                    else channel.default_exchange)
        await exchange.publish(aio_pika.Message(status_report(amqp_creds["endpoint_id"], message)),
                               routing_key=publish["routing_key"], mandatory=True, timeout=timeout)
