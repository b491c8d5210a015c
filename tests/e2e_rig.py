"""End to end with no Globus cloud: the local compute service (localservice/, on the real
RabbitMQ), a MEP that registers with it through globus-sdk, the real
globus-compute-endpoint as the UEP, and the real SDK Executor as the user."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
from pathlib import Path

from tests import mep_rig, rig

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


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class LocalService:
    """The local compute service as a process; `token(user)` gives a bearer token whose
    identity set is that user's (mep_rig.identity)."""

    def __init__(self, rigdir: rig.RigDir, users=("mept-alice@example.org", "mept-bob@example.org",
                                                  "eve@elsewhere.org", "admin@example.org")):
        self.dir = rigdir.path / f"service-{secrets.token_hex(3)}"
        self.dir.mkdir()
        self.tokens = {user: secrets.token_hex(16) for user in users}
        self.identities = {user: mep_rig.identity(user) for user in users}
        self.identities_path = self.dir / "identities.json"
        self.identities_path.write_text(json.dumps(
            {"tokens": {self.tokens[u]: [self.identities[u]] for u in users}}))
        assert port_free(PORT), f"port {PORT} is taken (a demo's local service still running?); stop it first"
        self.port = PORT
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.dir / "service.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([mep_rig.VENV_PYTHON, "-I", "-c", SERVICE.format(lib=str(rigdir.lib)),
                                      "--identities", str(self.identities_path), "--state", str(self.dir / "state.json"),
                                      "--port", str(self.port), "--purge-on-exit"], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        mep_rig.wait_for(lambda: "local compute service on" in self.output() or self.proc.poll() is not None,
                         what="the local service")
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def token_file(self, user: str, owner_gid: int) -> Path:
        path = self.dir / f"token-{secrets.token_hex(3)}"
        path.write_text(self.tokens[user])
        os.chown(path, 0, owner_gid)
        os.chmod(path, 0o640)
        return path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            rig.reap(self.proc, 10)
        self.log.close()


def live_mep(rigdir, service: LocalService, **kw) -> mep_rig.LiveMEP:
    """A LiveMEP that registers with `service` and runs the real UEP."""
    token = service.token_file("admin@example.org", rigdir.accounts.broker.pw_gid)
    config = {"compute_service_url": service.url, "compute_service_token_file": str(token), **kw.pop("config", {})}
    policy = {"uep_argv": [UEP_PROGRAM, "_start-user-endpoint", "{name}"], **kw.pop("policy", {})}
    mep = mep_rig.LiveMEP(rigdir, config=config, policy=policy, template=kw.pop("template", UEP_TEMPLATE),
                          schema=kw.pop("schema", UEP_SCHEMA), environment=kw.pop("environment", {}),
                          registration=False, **kw)
    mep.endpoint_id = registered_id(mep)  # the id the service gave it
    return mep


def run_sdk(service: LocalService, user: str, script: str, timeout: float = 120) -> dict:
    """Run `script` with the real SDK as `user`; it must print one JSON line last."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(service.dir), "GC_SERVICE": service.url,
           "GC_TOKEN": service.tokens[user], "PYTHONPATH": ""}
    out = subprocess.run([mep_rig.VENV_PYTHON, "-c", SDK_PRELUDE + script], capture_output=True, text=True,
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
    return mep_rig.wait_for(lambda: len(p := uep_pids(mep)) >= count and p, timeout, what=f"{count} UEP(s)")


def uep_pids(mep) -> list:
    pids = []
    for line in mep.output().splitlines():
        if "user endpoint started" in line:
            pids.append(int(line.split(" pid=")[1].split()[0]))
    return pids


def gone(pids, timeout=10.0) -> bool:
    return rig.wait_gone(pids, timeout) == []


def registered_id(mep) -> str:
    """The endpoint id the MEP got from the service (NAME/run/endpoint.json)."""
    return json.loads((mep.dir / "run" / "endpoint.json").read_text())["endpoint_id"]
