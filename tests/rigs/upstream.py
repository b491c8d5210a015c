"""Upstream's own MEP as a process: `globus-compute-endpoint start` (4.19, from the UEP
venv, unmodified) registering with the local service (tests/rigs/service.py), the
reference the service and the broker are held to (tests/test_upstream_reference.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

from tests.rigs.mep import idmap_expression
from tests.rigs.service import UEP_SCHEMA, UEP_TEMPLATE

UEP_VENV = "/opt/mep/uep-venv"
NAME = "upstream-mep"


class UpstreamMEP:
    """`globus-compute-endpoint start NAME` as root, in a process group of its own (on stop
    it TERMs its whole group)."""

    def __init__(self, rigdir, service):
        self.root = rigdir.path / f"upstream-{os.urandom(3).hex()}"
        self.dir = self.root / NAME
        self.dir.mkdir(parents=True, mode=0o700)
        (self.dir / "identity_mapping.json").write_text(json.dumps(idmap_expression()))
        (self.dir / "config.yaml").write_text(
            f"display_name: upstream reference\nidentity_mapping_config_path: {self.dir / 'identity_mapping.json'}\n"
            "local_compute_services: true\nemail: admin@example.org\nheartbeat_period: 5\n")
        (self.dir / "user_config_template.yaml.j2").write_text(UEP_TEMPLATE)
        (self.dir / "user_config_schema.json").write_text(json.dumps(UEP_SCHEMA))
        self.client_id, secret = service.add_client()
        env = {"PATH": f"{UEP_VENV}/bin:/usr/bin:/bin", "HOME": str(self.root), "GLOBUS_COMPUTE_USER_DIR": str(self.root),
               "GLOBUS_COMPUTE_CLIENT_ID": self.client_id, "GLOBUS_COMPUTE_CLIENT_SECRET": secret,
               "GLOBUS_SDK_SERVICE_URL_AUTH": service.url + "/"}  # a non-production Auth, as a user selects one
        self.log_path = self.root / "console.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([f"{UEP_VENV}/bin/globus-compute-endpoint", "start", NAME], env=env,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.root, start_new_session=True)

    def output(self) -> str:
        self.log.flush()
        text = self.log_path.read_text()
        log = self.dir / "endpoint.log"
        return text + (log.read_text() if log.exists() else "")

    def endpoint_id(self) -> str | None:
        try:
            return json.loads((self.dir / "endpoint.json").read_text())["endpoint_id"]
        except (OSError, ValueError, KeyError):
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
