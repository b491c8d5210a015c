"""End to end, no Globus cloud: the real SDK Executor -> the local compute service ->
RabbitMQ -> the MEP (root helper + broker) -> the real globus-compute-endpoint UEP as the
mapped user -> results back to the submitting user only."""

import pytest

from tests import e2e_rig

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.usefixtures("no_strays", "rabbitmq")]

WHOAMI = """
def whoami(x):
    import os, pwd
    return {"user": pwd.getpwuid(os.getuid()).pw_name, "uid": os.getuid(), "pid": os.getpid(), "x": x * 2}
"""


@pytest.fixture
def service(rigdir):
    svc = e2e_rig.LocalService(rigdir)
    yield svc
    svc.stop()


@pytest.fixture
def mep(rigdir, service):
    started = []

    def start(**kw):
        m = e2e_rig.live_mep(rigdir, service, **kw)
        started.append(m)
        return m
    yield start
    for m in started:
        m.stop()
        m.remove()


def submit(service, mep, user, script_body, **executor_kw):
    kw = ", ".join(f"{k}={v!r}" for k, v in executor_kw.items())
    script = WHOAMI + f"""
with Executor(endpoint_id={mep.endpoint_id!r}, client=client{', ' + kw if kw else ''}) as ex:
{script_body}
"""
    return e2e_rig.run_sdk(service, user, script)


def test_two_users_run_as_their_own_uids(service, mep, accounts):
    m = mep()
    m.endpoint_id = e2e_rig.registered_id(m)
    body = "    print(json.dumps(ex.submit(whoami, 21).result(timeout=90)))"
    alice = submit(service, m, "mept-alice@example.org", body)
    assert alice == {"user": "mept-alice", "uid": accounts.alice.pw_uid, "pid": alice["pid"], "x": 42}
