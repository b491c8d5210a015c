"""Upstream's MEP for the side-by-side benchmark: `globus-compute-endpoint start NAME` from
the pinned UEP venv (4.19, unmodified), as root, in a process group of its own, logging in
to the local service with client credentials (the service's Globus Auth routes) and
registering there, as tests/test_upstream_reference.py runs it.

Its UEP program is chosen the way upstream lets an administrator choose it: upstream's
forked child clears the environment, loads user_environment.yaml and execs
`globus-compute-endpoint _start-user-endpoint NAME` found on that PATH
(core_endpoint.py, cmd_start_endpoint). The PATH given here starts with a directory whose
`globus-compute-endpoint` is a symbolic link to the bench's probe, which timestamps its
exec and then either holds (names "holdN...") or execs the real globus-compute-endpoint
($MEPB_EXEC) with the same arguments. Our MEP gets the same probe in front of its UEP
program through its helper policy's uep_argv, so both are timed at the same instant.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time

from bench import fixture
from bench.mep import IDMAP

UEP_VENV = "/opt/mep/uep-venv"
NAME = "upstream-mep"


class Upstream:
    """Upstream's MEP registered with `service` (bench.e2e.Service, with a client named
    "upstream"); `environment` goes to its user_environment.yaml, with the probe's PATH."""

    def __init__(self, fx: fixture.Fixture, service, *, template: str, schema: dict, environment: dict):
        self.root = fx.dir / f"upstream-{secrets.token_hex(3)}"
        self.dir = self.root / NAME
        self.dir.mkdir(parents=True, mode=0o700)
        os.chmod(self.root, 0o755)
        self.reports = self.root / "reports"
        self.reports.mkdir()
        os.chmod(self.reports, 0o1777)
        probe_bin = self.root / "bin"
        probe_bin.mkdir()
        (probe_bin / "globus-compute-endpoint").symlink_to(fx.probe)
        files = {
            "config.yaml": f"display_name: upstream (bench)\nidentity_mapping_config_path: {self.dir}/idmap.json\n"
                           "local_compute_services: true\nemail: admin@bench.example\nheartbeat_period: 5\n",
            "idmap.json": json.dumps(IDMAP), "user_config_template.yaml.j2": template,
            "user_config_schema.json": json.dumps(schema),
            "user_environment.yaml": json.dumps({"PATH": f"{probe_bin}:/usr/bin:/bin",
                                                 "MEPB_REPORT_DIR": str(self.reports), **environment}),
        }
        for name, text in files.items():
            (self.dir / name).write_text(text)
        client_id, secret = service.client_credentials["upstream"]
        env = {"PATH": f"{UEP_VENV}/bin:/usr/bin:/bin", "HOME": str(self.root), "GLOBUS_COMPUTE_USER_DIR": str(self.root),
               "GLOBUS_COMPUTE_CLIENT_ID": client_id, "GLOBUS_COMPUTE_CLIENT_SECRET": secret,
               "GLOBUS_SDK_SERVICE_URL_AUTH": "http://127.0.0.1:5000/"}  # a non-production Auth
        self.log = open(self.root / "console.log", "w")
        self.proc = subprocess.Popen([f"{UEP_VENV}/bin/globus-compute-endpoint", "start", NAME], env=env,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + 60
        while self._registered() is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"upstream's MEP did not register:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        self.endpoint_id = self._registered()

    def _registered(self) -> str | None:
        try:
            return json.loads((self.dir / "endpoint.json").read_text())["endpoint_id"]
        except (OSError, ValueError, KeyError):
            return None

    def output(self) -> str:
        self.log.flush()
        log = self.dir / "endpoint.log"
        return (self.root / "console.log").read_text() + (log.read_text() if log.exists() else "")

    def stop(self) -> None:
        """SIGTERM to the MEP's process group, as the test does (upstream then TERMs its UEPs,
        and KILLs those still there); SIGKILL to the group after 60 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
