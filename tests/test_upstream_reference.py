"""Upstream's own MEP (globus-compute-endpoint 4.19, from the UEP venv, unmodified) against
the local service: it logs in with client credentials through the service's Globus Auth
routes, registers, heartbeats, takes a start command, forks a UEP as the mapped user, and
that UEP's result reaches the real SDK. The service thereby speaks what the protocol's
other implementation expects; whatever differs here is a bug in the service (or, if our
broker differs, in the broker: test_globus_auth.py compares what both send)."""

import pytest

from tests.rigs.procs import wait_for
from tests.rigs.service import run_sdk
from tests.rigs.upstream import NAME, UpstreamMEP

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.usefixtures("no_strays", "rabbitmq")]


def test_upstream_mep_runs_a_task_end_to_end_against_the_local_service(service, rigdir, accounts):
    mep = UpstreamMEP(rigdir, service)
    try:
        endpoint_id = wait_for(lambda: mep.endpoint_id() or (mep.proc.poll() is not None and "exited"), 60,
                               what="upstream's MEP to register")
        assert endpoint_id != "exited", mep.output()
        assert f"client_credentials: client {mep.client_id}" in service.output()
        (registration,) = service.get(f"/v3/endpoints/{endpoint_id}/registrations")
        assert registration["identity"] == mep.client_id
        same_as_ours(mep, registration)
        beats = wait_for(lambda: status(service, endpoint_id)["heartbeats"] or None, 30,
                         what="upstream's first heartbeat")
        assert beats[0]["global_state"] == {"heartbeat_period": 5.0}
        out = run_sdk(service, "mept-alice@example.org", f"""
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
    final = wait_for(lambda: (b := status(service, endpoint_id)["heartbeats"])[-1]["global_state"]
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
