"""The service's layer of the test rig, end to end with no Globus cloud: the local compute
service (localservice/, on the real RabbitMQ), a MEP that registers with it through
globus-sdk, the real globus-compute-endpoint as the UEP, and the real SDK Executor as the
user."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.request
import uuid
from pathlib import Path

from tests.rigs.helper import RigDir
from tests.rigs.mep import VENV_PYTHON, LiveMEP, identity
from tests.rigs.procs import port_free, reap, wait_for

UEP_PROGRAM = "/opt/mep/uep-venv/bin/mep-uep-start"  # scripts/setup.sh installs it (scripts/uep-start.sh)
SERVICE = "import sys; sys.path.insert(0, {lib!r}); from localservice.__main__ import main; sys.exit(main())"
UEP_TEMPLATE = """\
engine:
  type: ThreadPoolEngine
  max_workers: {{ max_workers | default(2) }}
heartbeat_period: {{ heartbeat_period | default(2) }}
idle_heartbeats_soft: {{ idle_heartbeats_soft | default(30) }}
idle_heartbeats_hard: {{ idle_heartbeats_hard | default(300) }}
"""
UEP_SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "properties": {"max_workers": {"type": "integer", "minimum": 1, "maximum": 8},
                             "heartbeat_period": {"type": "integer", "minimum": 1},
                             "idle_heartbeats_soft": {"type": "integer", "minimum": 0},
                             "idle_heartbeats_hard": {"type": "integer", "minimum": 1}},
              "additionalProperties": True}


PORT = 5000  # where the SDK's Client(local_compute_services=True) looks: http://localhost:5000


class LocalService:
    """The local compute service as a process; `token(user)` gives a bearer token whose
    identity set is that user's (tests/rigs/mep.py identity)."""

    def __init__(self, rigdir: RigDir, users=("mept-alice@example.org", "mept-bob@example.org",
                                                  "eve@elsewhere.org", "admin@example.org"),
                 token_lifetime: float | None = None):
        self.dir = rigdir.path / f"service-{secrets.token_hex(3)}"
        self.dir.mkdir()
        self.tokens = {user: secrets.token_hex(16) for user in users}
        self.identities = {user: identity(user) for user in users}
        self.identities_path = self.dir / "identities.json"
        self.clients: dict[str, str] = {}  # Globus Auth confidential clients: id -> secret
        self.write_identities()
        assert port_free(PORT), f"port {PORT} is taken (a demo's local service still running?); stop it first"
        self.port = PORT
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.dir / "service.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([VENV_PYTHON, "-I", "-c", SERVICE.format(lib=str(rigdir.lib)),
                                      "--identities", str(self.identities_path), "--state", str(self.dir / "state.json"),
                                      "--port", str(self.port), "--purge-on-exit",
                                      *(["--token-lifetime", str(token_lifetime)] if token_lifetime else [])],
                                     stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: "local compute service on" in self.output() or self.proc.poll() is not None,
                         what="the local service")
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def write_identities(self) -> None:
        """The identities file (the service reads it again when it changes: a client's
        secret changed here is a secret revoked)."""
        tmp = self.identities_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tokens": {self.tokens[u]: [self.identities[u]] for u in self.tokens},
                                   "clients": {c: {"secret": s} for c, s in self.clients.items()}}))
        os.replace(tmp, self.identities_path)

    def add_client(self) -> tuple[str, str]:
        """A new Globus Auth confidential client (a service account): (id, secret)."""
        client_id, secret = str(uuid.uuid4()), secrets.token_urlsafe(24)
        self.clients[client_id] = secret
        self.write_identities()
        return client_id, secret

    def credentials_file(self, client_id: str, owner_gid: int) -> Path:
        """The client credentials as an administrator installs them: root:broker 0640."""
        path = self.dir / f"client-{secrets.token_hex(3)}.env"
        path.write_text(f"GLOBUS_COMPUTE_CLIENT_ID={client_id}\nGLOBUS_COMPUTE_CLIENT_SECRET={self.clients[client_id]}\n")
        os.chown(path, 0, owner_gid)
        os.chmod(path, 0o640)
        return path

    def get(self, path: str, user: str = "admin@example.org"):
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.tokens[user]}"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def token_file(self, user: str, owner_gid: int) -> Path:
        path = self.dir / f"token-{secrets.token_hex(3)}"
        path.write_text(self.tokens[user])
        os.chown(path, 0, owner_gid)
        os.chmod(path, 0o640)
        return path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            reap(self.proc, 10)
        self.log.close()


def live_mep(rigdir, service: LocalService, auth: str = "token", **kw) -> LiveMEP:
    """A LiveMEP that registers with `service` and runs the real UEP. `auth`: "token" (a
    static bearer token file), "client" (a new confidential client of the service's Auth,
    its credentials in client_credentials_file; `mep.client_id`), "login" (no credential:
    `mepctl login NAME` gives one)."""
    config = {"compute_service_url": service.url}
    client_id = None
    if auth == "token":
        config["compute_service_token_file"] = str(service.token_file("admin@example.org", rigdir.accounts.broker.pw_gid))
    elif auth == "client":
        client_id, _ = service.add_client()
        config["client_credentials_file"] = str(service.credentials_file(client_id, rigdir.accounts.broker.pw_gid))
    if auth != "token":
        config["auth_service_url"] = service.url  # the variable a user sets for a non-production Auth
    config.update(kw.pop("config", {}))
    policy = {"uep_argv": [UEP_PROGRAM, "_start-user-endpoint", "{name}"], **kw.pop("policy", {})}
    mep = LiveMEP(rigdir, config=config, policy=policy, template=kw.pop("template", UEP_TEMPLATE),
                          schema=kw.pop("schema", UEP_SCHEMA), environment=kw.pop("environment", {}),
                          registration=False, **kw)
    mep.client_id = client_id
    if (mep.dir / "run" / "endpoint.json").exists():
        mep.endpoint_id = registered_id(mep)  # the id the service gave it
    return mep


def run_sdk(service: LocalService, user: str, script: str, timeout: float = 120) -> dict:
    """Run `script` with the real SDK as `user`; it must print one JSON line last."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(service.dir), "GC_SERVICE": service.url,
           "GC_TOKEN": service.tokens[user], "PYTHONPATH": ""}
    out = subprocess.run([VENV_PYTHON, "-c", SDK_PRELUDE + script], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert out.returncode == 0, f"SDK script failed:\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


SDK_PRELUDE = """\
import json, os, sys
import globus_sdk
from globus_compute_sdk import Client, Executor
client = Client(local_compute_services=True, authorizer=globus_sdk.AccessTokenAuthorizer(os.environ["GC_TOKEN"]))
"""


def wait_for_uep(mep, count: int, timeout: float = 60) -> list:
    return wait_for(lambda: len(p := uep_pids(mep)) >= count and p, timeout, what=f"{count} UEP(s)")


def uep_pids(mep) -> list:
    pids = []
    for line in mep.output().splitlines():
        if "user endpoint started" in line:
            pids.append(int(line.split(" pid=")[1].split()[0]))
    return pids


def registered_id(mep) -> str:
    """The endpoint id the MEP got from the service (NAME/run/endpoint.json)."""
    return json.loads((mep.dir / "run" / "endpoint.json").read_text())["endpoint_id"]
