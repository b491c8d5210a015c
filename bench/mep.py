"""MEP overhead: a start-UEP command published to RabbitMQ -> the UEP's first instruction
after exec, with the static probe as the UEP program. Everything the MEP does is in it:
AMQP delivery, command checks, identity mapping, template rendering and schema
validation, the helper round trip, fork, privilege drop and exec. Also the broker's
resident memory, idle and with 100 UEPs alive.

The MEP is the real one: the helper in --launch mode (root) starting the installed broker
as the bench's broker account, with a registration.json naming a queue of its own.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import secrets
import subprocess
import sys
import time
import uuid

import aio_pika

from bench import fixture
from bench.memory import rss_kib

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
TEMPLATE = """engine:
  type: ThreadPoolEngine
  max_workers: {{ max_workers | default(2) }}
"""
SCHEMA = {"type": "object", "properties": {"max_workers": {"type": "integer", "minimum": 1, "maximum": 8}}}


def identity(username: str) -> dict:
    ident = str(uuid.uuid5(uuid.NAMESPACE_DNS, username))
    return {"id": ident, "sub": ident, "username": username, "name": username.split("@")[0], "status": "used",
            "identity_provider": str(uuid.UUID(int=7))}


def command(user: str, name: str, heartbeat: str) -> bytes:
    creds = {"endpoint_id": name, "heartbeat_queue_info": {"connection_url": AMQP_URL, "queue": heartbeat,
             "queue_publish_kwargs": {"exchange": "", "routing_key": heartbeat}}}
    ident = identity(f"{user}@bench.example")
    return json.dumps({"command": "cmd_start_endpoint", "args": [],
                       "kwargs": {"name": name, "amqp_creds": creds, "user_opts": {"max_workers": 2},
                                  "user_runtime": {}},
                       "globus_effective_identity": ident["id"], "globus_identity_set": [ident],
                       "globus_username": ident["username"]}).encode()


IDMAP = [{"DATA_TYPE": "expression_identity_mapping#1.0.0",
          "mappings": [{"source": "{username}", "match": r"(.*)@bench\.example", "output": "{0}"}]}]


class MEP:
    """A running MEP in its own directory under the fixture's. With `registration` (the
    default) it consumes a queue of its own named in registration.json; without, `config`
    must name a service to register with. `uep_argv` replaces the probe as the UEP program
    (the helper adds the UEP name); `environment` adds to the UEPs' user_environment.yaml."""

    def __init__(self, fx: fixture.Fixture, *, config=None, template=TEMPLATE, schema=SCHEMA, uep_argv=None,
                 registration=True, environment=None):
        self.fx, self.tag = fx, secrets.token_hex(3)
        self.dir = fx.dir / f"mep-{self.tag}"
        self.dir.mkdir(mode=0o755)
        self.reports = self.dir / "reports"
        self.reports.mkdir(mode=0o1777)
        os.chmod(self.reports, 0o1777)
        self.queue, self.heartbeat = f"mepb-cmd-{self.tag}", f"mepb-hb-{self.tag}"
        self.registration = registration
        files = {
            "config.yaml": json.dumps({"multi_user": True, "identity_mapping_config_path": "idmap.json",
                                       "mu_child_ep_grace_period_s": 2, **(config or {})}),
            "idmap.json": json.dumps(IDMAP), "user_config_template.yaml.j2": template,
            "user_config_schema.json": json.dumps(schema),
            "user_environment.yaml": json.dumps({"MEPB_REPORT_DIR": str(self.reports), **(environment or {})}),
        }
        if registration:
            files["registration.json"] = json.dumps({"endpoint_id": str(uuid.uuid4()), "command_queue_info": {
                "connection_url": AMQP_URL, "queue": self.queue}})
        for name, text in files.items():
            (self.dir / name).write_text(text)
        for name in ("endpoint.log", "run"):
            path = self.dir / name
            path.mkdir(mode=0o700) if name == "run" else path.touch(mode=0o640)
            os.chown(path, fx.broker.pw_uid, fx.broker.pw_gid)
        broker_argv = [f"{sys.prefix}/bin/python3", "-I", "-m", "broker.main", "--conf-dir", str(self.dir),
                       "--key", str(fx.dir / "key")]
        policy = fx.policy_nopam.read_text().replace("uep_argv", f"broker_argv = {json.dumps(broker_argv)}\nuep_argv", 1)
        if uep_argv:
            policy = policy.replace(json.dumps(fx.probe), ", ".join(map(json.dumps, uep_argv)), 1)
        self.policy = self.dir / "policy.toml"
        self.policy.write_text(policy)
        if registration:
            asyncio.run(self._queues("declare"))
        self.log = open(self.dir / "helper.log", "w")
        self.proc = subprocess.Popen(fixture.helper_argv(self.policy, "--launch"), stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "consuming start commands" not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the MEP did not start:\n{(self.dir / 'helper.log').read_text()[-2000:]}\n"
                                   f"{self.output()[-2000:]}")
            time.sleep(0.05)

    def output(self) -> str:
        """The broker's endpoint.log."""
        return (self.dir / "endpoint.log").read_text()

    @property
    def endpoint_id(self) -> str:
        name = "registration.json" if self.registration else "run/endpoint.json"
        return json.loads((self.dir / name).read_text())["endpoint_id"]

    async def _queues(self, what: str) -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for name in (self.queue, self.heartbeat):
                if what == "declare":
                    await channel.declare_queue(name)
                else:
                    await channel.queue_delete(name)

    def broker_pid(self) -> int:
        """The helper's child that runs as the broker account (the others are root session
        processes; pids wrap at pid_max, so the lowest pid is not always the broker)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-u", self.fx.broker.pw_name],
                             capture_output=True, text=True).stdout.split()
        if len(out) != 1:
            raise RuntimeError(f"expected one broker process under helper {self.proc.pid}, found {out}")
        return int(out[0])

    async def offer(self, users: list, count: int, rate: float, prefix: str) -> dict:
        return await offer(self.queue, self.heartbeat, users, count, rate, prefix)

    def wait_reports(self, names, timeout: float = 60) -> dict:
        return wait_reports(self.reports, names, timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.broker_pid(), 15)
            self.proc.wait(60)
        self.log.close()
        if self.registration:
            asyncio.run(self._queues("delete"))


async def offer(queue: str, heartbeat: str, users: list, count: int, rate: float, prefix: str) -> dict:
    """Publish `count` start commands to `queue` at `rate` per second over `users`, named
    PREFIX00000..; name -> publish time (ns)."""
    sent = {}
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        start = time.monotonic()
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            name = f"{prefix}{i:05d}"
            body = command(users[i % len(users)], name, heartbeat)
            sent[name] = time.monotonic_ns()
            await channel.default_exchange.publish(
                aio_pika.Message(body, content_type="application/json",
                                 timestamp=datetime.datetime.now(datetime.timezone.utc)), routing_key=queue)
    return sent


def wait_reports(reports, names, timeout: float = 60) -> dict:
    """name -> the probe's exec time (ns) for every name, once all have reported."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {n: reports / n for n in names}
        if all(p.exists() and p.stat().st_size for p in found.values()):
            return {n: int(p.read_text()) for n, p in found.items()}
        time.sleep(0.05)
    missing = [n for n in names if not (reports / n).exists()]
    raise RuntimeError(f"{len(missing)} UEPs never started; see the MEP's log beside {reports}")


def measure(fx: fixture.Fixture, count: int, rate: float, live: int, say=print) -> dict:
    mep = MEP(fx)
    try:
        users = [a.pw_name for a in fx.accounts]
        say(f"MEP overhead: {count} start commands at {rate:.0f}/s")
        asyncio.run(mep.offer(users, 10, 20, "warm-"))  # warm-up: imports, connections
        mep.wait_reports([f"warm-{i:05d}" for i in range(10)])
        sent = asyncio.run(mep.offer(users, count, rate, "uep-"))
        started = mep.wait_reports(list(sent))
        latency = [started[n] - sent[n] for n in sent]
        time.sleep(1)
        broker = mep.broker_pid()
        idle = rss_kib(broker)
        say(f"broker memory: {live} live UEPs")
        asyncio.run(mep.offer(users, live, 200, "hold-"))
        mep.wait_reports([f"hold-{i:05d}" for i in range(live)])
        with_ueps = rss_kib(broker)
        return {"latency_ns": latency, "offered_per_s": rate,
                "broker_memory": {"idle_kib": idle, f"with_{live}_ueps_kib": with_ueps}}
    finally:
        mep.stop()
