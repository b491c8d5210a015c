"""Upstream's own MEP (globus-compute-endpoint 4.19, from the UEP venv, unmodified) against
the local service: it logs in with client credentials through the service's Globus Auth
routes, registers, heartbeats, takes a start command, forks a UEP as the mapped user, and
that UEP's result reaches the real SDK. The service thereby speaks what the protocol's
other implementation expects; whatever differs here is a bug in the service (or, if our
broker differs, in the broker: test_globus_auth.py compares what both send)."""

import json
import os
import signal
import subprocess

import pytest

from tests import e2e_rig, mep_rig

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.usefixtures("no_strays", "rabbitmq")]

UEP_VENV = "/opt/mep/uep-venv"
NAME = "upstream-mep"


@pytest.fixture
def service(rigdir):
    svc = e2e_rig.LocalService(rigdir)
    yield svc
    svc.stop()


class UpstreamMEP:
    """`globus-compute-endpoint start NAME` as root, in a process group of its own (on stop
    it TERMs its whole group)."""

    def __init__(self, rigdir, service):
        self.root = rigdir.path / f"upstream-{os.urandom(3).hex()}"
        self.dir = self.root / NAME
        self.dir.mkdir(parents=True, mode=0o700)
        (self.dir / "identity_mapping.json").write_text(json.dumps(mep_rig.idmap_expression()))
        (self.dir / "config.yaml").write_text(
            f"display_name: upstream reference\nidentity_mapping_config_path: {self.dir / 'identity_mapping.json'}\n"
            "local_compute_services: true\nemail: admin@example.org\nheartbeat_period: 5\n")
        (self.dir / "user_config_template.yaml.j2").write_text(e2e_rig.UEP_TEMPLATE)
        (self.dir / "user_config_schema.json").write_text(json.dumps(e2e_rig.UEP_SCHEMA))
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


def test_upstream_mep_runs_a_task_end_to_end_against_the_local_service(service, rigdir, accounts):
    mep = UpstreamMEP(rigdir, service)
    try:
        endpoint_id = mep_rig.wait_for(lambda: mep.endpoint_id() or (mep.proc.poll() is not None and "exited"), 60,
                                       what="upstream's MEP to register")
        assert endpoint_id != "exited", mep.output()
        assert f"client_credentials: client {mep.client_id}" in service.output()
        (registration,) = service.get(f"/v3/endpoints/{endpoint_id}/registrations")
        assert registration["identity"] == mep.client_id
        same_as_ours(mep, registration)
        beats = mep_rig.wait_for(lambda: status(service, endpoint_id)["heartbeats"] or None, 30,
                                 what="upstream's first heartbeat")
        assert beats[0]["global_state"] == {"heartbeat_period": 5.0}
        out = e2e_rig.run_sdk(service, "mept-alice@example.org", f"""
def whoami(x):
    import os, pwd
    return {{"user": pwd.getpwuid(os.getuid()).pw_name, "x": x * 2}}
with Executor(endpoint_id={endpoint_id!r}, client=client) as ex:
    print(json.dumps(ex.submit(whoami, 21).result(timeout=120)))
""", timeout=180)
        assert out == {"user": "mept-alice", "x": 42}, mep.output()
        assert mep.proc.poll() is None, mep.output()
    finally:
        mep.stop()
    final = mep_rig.wait_for(lambda: (b := status(service, endpoint_id)["heartbeats"])[-1]["global_state"]
                             ["heartbeat_period"] == 0 and b[-1], 15, what="upstream's final heartbeat")
    assert final["global_state"] == {"heartbeat_period": 0}  # upstream's last word at stop


def same_as_ours(mep, registration) -> None:
    """What our broker would send for the same files is what upstream sent: the body's
    keys, the metadata (but the local account: root there, the broker account here) and
    the User-Agent."""
    import types

    import globus_sdk
    from globus_compute_common.sdk_version_sharing import user_agent_substring

    from broker import registration as ours
    config = types.SimpleNamespace(
        conf_dir=mep.dir, name=NAME, display_name="upstream reference", allowed_functions=None,
        authentication_policy=None, subscription_id=None, public=False, high_assurance=False, admins=(),
        user_config_template_path=mep.dir / "user_config_template.yaml.j2",
        user_config_schema_path=mep.dir / "user_config_schema.json")
    body, upstream = ours.body(config), registration["body"]
    assert sorted(body) == sorted(upstream), (body, upstream)
    assert {k: v for k, v in body.items() if k != "metadata"} == {k: v for k, v in upstream.items() if k != "metadata"}
    assert {**body["metadata"], "local_user": "root"} == upstream["metadata"]
    assert registration["user_agent"] == f"globus-sdk-py-{globus_sdk.__version__}/{user_agent_substring(ours.SDK_VERSION)}"


def status(service, endpoint_id):
    return service.get(f"/v2/endpoints/{endpoint_id}/status")
