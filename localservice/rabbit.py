"""RabbitMQ as the local service uses it: accounts through the management HTTP API, and
the queues and exchanges of each endpoint.

Every MEP, UEP and user gets its own RabbitMQ account whose permissions name only its
own queues and exchanges, so one UEP cannot read another's tasks and one user cannot
read another's results (as with the real service's per-endpoint credentials).
"""

from __future__ import annotations

import re
import secrets
import urllib.parse

import aio_pika
import aiohttp


def _only(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$" if names else "^$"


class Rabbit:
    def __init__(self, amqp_url: str, management_url: str):
        self.amqp_url, self.management_url = amqp_url, management_url.rstrip("/")
        parsed = urllib.parse.urlsplit(amqp_url)
        self._auth = aiohttp.BasicAuth(urllib.parse.unquote(parsed.username or "guest"),
                                       urllib.parse.unquote(parsed.password or "guest"))
        self._host_port = f"{parsed.hostname}:{parsed.port or 5672}"
        self.http: aiohttp.ClientSession | None = None
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def open(self) -> None:
        self.http = aiohttp.ClientSession(auth=self._auth, timeout=aiohttp.ClientTimeout(total=15))
        async with self.http.get(f"{self.management_url}/api/overview") as r:
            if r.status != 200:
                raise RuntimeError(f"RabbitMQ management API at {self.management_url}: HTTP {r.status}; enable it "
                                   "with `rabbitmq-plugins enable rabbitmq_management`")
        self.connection = await aio_pika.connect_robust(self.amqp_url, client_properties={
            "connection_name": "mep local compute service"})
        self.channel = await self.connection.channel()

    async def purge(self, queue_prefixes=("uep.", "mep.", "tg."), user_prefixes=("uep-", "mep-", "user-")) -> int:
        """Delete every queue, exchange and account this service creates (by their name
        prefixes): a demo or test run must not leave durable queues behind, which pile up
        and slow down every later RabbitMQ restart. Returns how many were deleted. Closes
        the AMQP connection first: its robust channel would declare a deleted queue again."""
        if self.connection is not None:
            await self.connection.close()
            self.connection = None
        deleted = 0
        for kind, prefixes in (("queues", queue_prefixes), ("exchanges", queue_prefixes), ("users", user_prefixes)):
            async with self.http.get(f"{self.management_url}/api/{kind}") as r:
                r.raise_for_status()
                items = await r.json()
            for item in items:
                if not item["name"].startswith(prefixes):
                    continue
                where = "" if kind == "users" else "%2F/"
                async with self.http.delete(
                        f"{self.management_url}/api/{kind}/{where}{urllib.parse.quote(item['name'], safe='')}") as r:
                    deleted += r.status in (200, 204)
        return deleted

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        if self.http is not None:
            await self.http.close()

    async def account(self, name: str, *, read=(), write=(), read_pattern: str | None = None) -> str:
        """(Re)create the account `name` with a fresh password and permissions on exactly
        the named queues/exchanges (or, to read, a pattern); returns its amqp:// URL."""
        password = secrets.token_urlsafe(24)
        user = urllib.parse.quote(name, safe="")
        async with self.http.put(f"{self.management_url}/api/users/{user}",
                                 json={"password": password, "tags": ""}) as r:
            r.raise_for_status()
        async with self.http.put(f"{self.management_url}/api/permissions/%2F/{user}",
                                 json={"configure": "^$", "write": _only(*write),
                                       "read": read_pattern or _only(*read)}) as r:
            r.raise_for_status()
        return f"amqp://{user}:{urllib.parse.quote(password, safe='')}@{self._host_port}/"

    async def queue(self, name: str, *, expires_ms: int | None = None) -> aio_pika.abc.AbstractQueue:
        arguments = {"x-expires": expires_ms} if expires_ms else None
        return await self.channel.declare_queue(name, durable=True, arguments=arguments)

    async def exchange_to_queue(self, name: str, routing_key: str) -> aio_pika.abc.AbstractQueue:
        """A direct exchange `name` bound to a queue of the same name."""
        exchange = await self.channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, durable=True)
        queue = await self.queue(name)
        await queue.bind(exchange, routing_key)
        return queue

    async def publish(self, queue: str, body: bytes, **properties) -> None:
        await self.channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties), routing_key=queue)
