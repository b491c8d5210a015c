"""The MEP's layer of the test rig: a live MEP, the real helper (--launch, root) starting
the real broker as mept-broker, consuming a real RabbitMQ queue, with the probe as the
UEP program.

Commands are published in upstream's format; failure notices are read back from the
heartbeat queue named in the command's amqp_creds, exactly where the service would read
them.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import pty
import secrets
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import aio_pika

from tests.rigs.helper import RigDir
from tests.rigs.procs import reap, run, wait_for

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
VENV_PYTHON = "/opt/mep/venv/bin/python3"  # has the broker's dependencies (scripts/setup.sh)
BOOT = "import sys; sys.path.insert(0, {lib!r}); from broker.main import main; sys.exit(main())"
MEPCTL = "import sys; sys.path.insert(0, {lib!r}); from broker.mepctl import main; sys.exit(main())"

TEMPLATE = """\
engine:
  type: ThreadPoolEngine
  max_workers: {{ max_workers | default(2) }}
{%- if worker_init is defined %}
worker_init: {{ worker_init }}
{%- endif %}
display_name: {{ _GC.mapped_identity.local.uname }}
"""
SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
          "properties": {"max_workers": {"type": "integer", "minimum": 1, "maximum": 8},
                         "worker_init": {"type": "string"}},
          "additionalProperties": True}


def idmap_expression(domain: str = "example.org") -> list:
    return [{"DATA_TYPE": "expression_identity_mapping#1.0.0",
             "mappings": [{"source": "{username}", "match": "(.*)@" + domain.replace(".", "\\."),
                           "output": "{0}"}]}]


def identity(username: str) -> dict:
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_DNS, username)), "sub": str(uuid.uuid5(uuid.NAMESPACE_DNS, username)),
            "username": username, "name": username.split("@")[0], "identity_provider": str(uuid.UUID(int=7)),
            "status": "used", "email": username}


async def _declare(*names: str, durable=False) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.declare_queue(name, auto_delete=False, durable=durable)


async def _depth(queue: str) -> int:
    """Messages ready in `queue` (not those delivered and unacked)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        return (await channel.declare_queue(queue, passive=True)).declaration_result.message_count


async def _delete(*names: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)


async def _publish(queue: str, body: bytes, content_type="application/json", timestamp=None, persistent=False) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        ts = timestamp if timestamp is not None else datetime.datetime.now(datetime.timezone.utc)
        mode = aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        await channel.default_exchange.publish(aio_pika.Message(body, content_type=content_type, timestamp=ts,
                                                                delivery_mode=mode), routing_key=queue)


async def _get(queue: str, timeout: float) -> bytes | None:
    """The next message of `queue` within `timeout` s, polled on one connection (not
    procs.wait_for, which would open one per poll)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = await q.get(fail=False)
            if message is not None:
                await message.ack()
                return message.body
            await asyncio.sleep(0.05)
    return None


def many(factory):
    """A fixture body: yields start(**kw) -> factory(**kw); stops and removes each MEP after the test."""
    started = []

    def start(**kw):
        started.append(factory(**kw))
        return started[-1]
    yield start
    for mep in started:
        mep.stop()
        mep.remove()


def _copy_pty(master: int, path: Path) -> None:
    with open(path, "ab", buffering=0) as f:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            f.write(data)
    os.close(master)


class LiveMEP:
    def __init__(self, rigdir: RigDir, *, config: dict | None = None, idmap=None, template: str = TEMPLATE,
                 schema=SCHEMA, environment: dict | None = None, policy: dict | None = None, tty: bool = False,
                 registration: bool = True, durable: bool = False, amqp_url: str = AMQP_URL, wait: bool = True):
        self.rigdir, self.accounts = rigdir, rigdir.accounts
        self.tag = secrets.token_hex(4)
        self.dir = rigdir.path / f"mep-{self.tag}"
        self.dir.mkdir(mode=0o755)
        self.reports = self.dir / "reports"
        self.reports.mkdir()
        os.chmod(self.reports, 0o1777)
        self.command_queue = f"mept-cmd-{self.tag}"
        self.endpoint_id = str(uuid.uuid4())
        self.queues = [self.command_queue]
        self.durable = durable  # a durable command queue and persistent commands survive a RabbitMQ restart
        asyncio.run(_declare(self.command_queue, durable=durable))
        cfg = {"multi_user": True, "display_name": f"test MEP {self.tag}",
               "identity_mapping_config_path": str(self.dir / "identity_mapping.json")}
        pam = (policy or {}).get("pam", {})
        if pam.get("enabled"):  # config.yaml's pam: must agree with the policy's (broker/main.py pam_problem)
            cfg["pam"] = {"enable": True, "service_name": pam["service"]}
        cfg.update(config or {})
        self.write("config.yaml", json.dumps(cfg))  # JSON is YAML
        self.write("identity_mapping.json", json.dumps(idmap if idmap is not None else idmap_expression()))
        self.write("user_config_template.yaml.j2", template)
        if schema is not None:
            self.write("user_config_schema.json", json.dumps(schema))
        env = {"PROBE_REPORT_DIR": str(self.reports), "PROBE_ACTION": json.dumps({"sleep": 60})}
        env.update(environment or {})
        self.write("user_environment.yaml", json.dumps(env))
        if registration:  # else the broker registers with the service named in config
            self.write("registration.json", json.dumps({"endpoint_id": self.endpoint_id, "command_queue_info": {
                "connection_url": amqp_url, "queue": self.command_queue}}))
        self.log_path = self.dir / "endpoint.log"
        self.log_path.touch()
        os.chown(self.log_path, self.accounts.broker.pw_uid, self.accounts.broker.pw_gid)
        (self.dir / "run").mkdir(mode=0o700)  # as `mepctl configure` makes it: the admin socket's directory
        os.chown(self.dir / "run", self.accounts.broker.pw_uid, self.accounts.broker.pw_gid)
        self.broker_argv = [VENV_PYTHON, "-I", "-c", BOOT.format(lib=str(rigdir.lib)), "--conf-dir", str(self.dir),
                            "--key", str(rigdir.key_file), "--log-to-console"]
        self.policy = rigdir.policy(broker_argv=self.broker_argv, **(policy or {}))
        self.helper_log_path = self.dir / "helper.log"
        self.helper_log = open(self.helper_log_path, "w")
        out = self.helper_log
        if tty:  # the helper and broker write to a terminal; a thread copies it into helper.log
            master, out = pty.openpty()
            threading.Thread(target=_copy_pty, args=(master, self.helper_log_path), daemon=True).start()
        try:
            self.proc = self.launch(out)
        finally:
            if tty:
                os.close(out)
        if not wait:  # the caller watches the start itself (a start expected to fail)
            return
        wait_for(lambda: "consuming start commands" in self.output() or self.proc.poll() is not None,
                 what="the broker to consume")
        if self.proc.poll() is not None:
            asyncio.run(_delete(*self.queues))  # a MEP that did not start leaves no queue behind
            raise AssertionError(f"MEP ended at start:\n{self.output()}")

    def relaunch(self, wait: bool = True) -> None:
        """Start a new helper and broker on the same directory and command queue, after the
        last one ended (what an init system's restart does)."""
        assert self.proc.poll() is not None, "the MEP is still running"
        starts = self.output().count("consuming start commands")
        self.helper_log = open(self.helper_log_path, "a")
        self.proc = self.launch(self.helper_log)
        if not wait:
            return
        wait_for(lambda: self.output().count("consuming start commands") > starts or self.proc.poll() is not None,
                 what="the relaunched broker to consume")
        assert self.proc.poll() is None, f"the relaunched MEP ended:\n{self.output()}"

    def queue_depth(self) -> int:
        return asyncio.run(_depth(self.command_queue))

    def launch(self, out) -> subprocess.Popen:
        """Start the MEP writing to `out`; the process returned is the one whose end ends the MEP."""
        return subprocess.Popen(self.rigdir.helper_cmd(self.policy, "--launch"), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)

    def write(self, name: str, text: str, mode=0o644) -> Path:
        path = self.dir / name
        path.write_text(text)
        os.chmod(path, mode)
        return path

    def output(self) -> str:
        if not self.helper_log.closed:
            self.helper_log.flush()
        return self.helper_log_path.read_text()

    def mepctl(self, *args, timeout=60) -> subprocess.CompletedProcess:
        """`mepctl COMMAND NAME ARGS` (as root) for this MEP, with this checkout's code."""
        command, *rest = args
        return subprocess.run([VENV_PYTHON, "-I", "-c", MEPCTL.format(lib=str(self.rigdir.lib)), command,
                               self.dir.name, "--config-root", str(self.rigdir.path), *rest],
                              capture_output=True, text=True, timeout=timeout)

    def broker_pid(self) -> int:
        out = run("pgrep", "-P", str(self.proc.pid), "-u", self.accounts.broker.pw_name, check=False).stdout.split()
        assert len(out) == 1, f"expected one broker child of the helper, found {out}"
        return int(out[0])

    def command(self, username: str, *, name: str | None = None, user_opts=None, user_runtime=None,
                identities=None, **overrides) -> dict:
        """A start command as the web service sends it; returns it (with its queues)."""
        name = name or str(uuid.uuid4())
        heartbeat = f"mept-hb-{secrets.token_hex(4)}"
        self.queues.append(heartbeat)
        asyncio.run(_declare(heartbeat))
        creds = {"endpoint_id": name, "heartbeat_queue_info": {"connection_url": AMQP_URL, "queue": heartbeat,
                 "queue_publish_kwargs": {"exchange": "", "routing_key": heartbeat}},
                 "task_queue_info": {"connection_url": AMQP_URL, "queue": f"tasks-{name}"},
                 "result_queue_info": {"connection_url": AMQP_URL, "queue": "results",
                                       "queue_publish_kwargs": {"exchange": "", "routing_key": "results"}},
                 "token": secrets.token_hex(8)}
        idents = identities if identities is not None else [identity(username)]
        body = {"command": "cmd_start_endpoint", "args": [],
                "kwargs": {"name": name, "amqp_creds": creds, "user_opts": user_opts or {},
                           "user_runtime": user_runtime or {}},
                "globus_effective_identity": idents[0]["id"] if idents else str(uuid.uuid4()),
                "globus_identity_set": idents, "globus_username": username}
        body.update(overrides)
        return body

    def publish(self, body, **kw) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        asyncio.run(_publish(self.command_queue, raw, persistent=self.durable, **kw))

    def notice(self, command: dict, timeout=15.0) -> dict | None:
        """The EPStatusReport the broker sent for `command`, decoded, or None."""
        raw = asyncio.run(_get(command["kwargs"]["amqp_creds"]["heartbeat_queue_info"]["queue"], timeout))
        if raw is None:
            return None
        assert raw[:1] == b"\x01", raw[:20]
        return json.loads(raw[1:])

    def report(self, pid=None, timeout=15.0) -> dict:
        """The probe's first report (from inside the UEP), for `pid` or the only UEP."""
        def find():
            files = [self.reports / f"{pid}.jsonl"] if pid else sorted(self.reports.glob("*.jsonl"))
            for f in files:
                if f.exists() and f.read_text().strip():
                    return [json.loads(line) for line in f.read_text().splitlines()]
            return None
        try:
            return wait_for(find, timeout, what=f"a probe report {pid or ''}")
        except AssertionError as e:
            raise AssertionError(f"{e}; MEP log:\n{self.output()}") from None

    def reports_now(self) -> dict:
        return {int(f.stem): [json.loads(x) for x in f.read_text().splitlines()] for f in self.reports.glob("*.jsonl")
                if f.read_text().strip()}

    def stop(self, sig=15) -> int:
        if self.proc.poll() is None:
            try:
                os.kill(self.broker_pid(), sig)
            except AssertionError:
                self.proc.terminate()
            reap(self.proc, 30)
        self.helper_log.close()
        try:
            asyncio.run(_delete(*self.queues))
        except Exception:  # noqa: BLE001 - cleanup only
            pass
        return self.proc.returncode

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Terminal:
    """A LiveMEP relaunched on a pty that is its controlling terminal: the helper is the
    session leader and the foreground process group, as under an administrator's shell."""

    def __init__(self, mep: LiveMEP):
        self.master, slave = pty.openpty()
        os.kill(mep.broker_pid(), signal.SIGTERM)  # the rig's own launch (not on a terminal) makes way
        reap(mep.proc, 30)
        mep.proc = subprocess.Popen(mep.rigdir.helper_cmd(mep.policy, "--launch"), stdin=slave, stdout=slave, stderr=slave,
                                    preexec_fn=lambda: os.login_tty(slave), close_fds=True)
        os.close(slave)
        self.out = b""
        wait_for(lambda: self.read().count(b"consuming start commands") > 0 or mep.proc.poll() is not None,
                 timeout=20, what="the broker on the terminal")
        assert mep.proc.poll() is None, self.out.decode("utf-8", "replace")

    def read(self) -> bytes:
        os.set_blocking(self.master, False)
        try:
            while chunk := os.read(self.master, 65536):
                self.out += chunk
        except (BlockingIOError, OSError):
            pass
        return self.out

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)
