"""Fixtures that build real things (the rigs of tests/rigs/): accounts, a root-owned policy
directory, helpers, live MEPs, the local service, the Slurm cluster.

Tests marked `root` need uid 0. Outside CI they are skipped when not root; under CI=true
they fail instead, so that a privileged test can never pass by not running.
"""

import asyncio
import os
import subprocess

import aio_pika
import pytest
from hypothesis import settings

# bench/mutate.py runs the tests once per mutant: fewer examples, and the same ones every run
settings.register_profile("mutation", max_examples=30, derandomize=True, deadline=None)

from tests.rigs import procs
from tests.rigs.accounts import Accounts, cleanup
from tests.rigs.helper import Client, Helper, RigDir
from tests.rigs.mep import AMQP_URL, LiveMEP, many
from tests.rigs.service import LocalService, live_mep
from tests.rigs.slurm import Cluster, why_not_available

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    for item in items:
        if "root" in item.keywords:
            if IN_CI:
                item.add_marker(pytest.mark.usefixtures("_fail_not_root"))
            else:
                item.add_marker(pytest.mark.skip(reason="needs root (run the suite as root: bash scripts/test.sh)"))


@pytest.fixture
def _fail_not_root():
    pytest.fail("this test needs root, and CI=true forbids skipping it")


@pytest.fixture(scope="session")
def accounts():
    if os.geteuid() != 0:
        pytest.fail("accounts need root")
    cleanup()
    try:
        yield Accounts()
    finally:
        cleanup()


@pytest.fixture(scope="session")
def rigdir(accounts):
    return RigDir(accounts)


@pytest.fixture
def helpers(rigdir):
    """start(policy=None, **overrides) -> (Helper, Client after the handshake)."""
    started = []

    def start(policy=None, handshake=True, **overrides):
        helper = Helper(rigdir, policy or rigdir.policy(**overrides))
        started.append(helper)
        client = Client(helper.sock, rigdir.key)
        if handshake:
            try:
                client.handshake()
            except Exception as e:
                raise AssertionError(f"no handshake with the helper ({e!r}); its log:\n{helper.output()}") from e
        return helper, client

    yield start
    for helper in started:
        helper.stop()


@pytest.fixture
def no_strays(accounts):
    """After the test, no process may run as a test user; kill and fail if one does."""
    yield
    names = [accounts.alice, accounts.bob, accounts.carol]
    left = {a.pw_name: procs.processes_of(a.pw_name) for a in names}
    left = {k: v for k, v in left.items() if v}
    for pids in left.values():
        procs.kill_all(pids)
    assert not left, f"processes left running as test users: {left}"


@pytest.fixture
def sh():
    def run(*cmd):
        return subprocess.run(cmd, capture_output=True, text=True)
    return run


@pytest.fixture(scope="session")
def rabbitmq():
    """RabbitMQ must be up: this fails (never skips) when it is not."""
    async def ping():
        connection = await aio_pika.connect(AMQP_URL, timeout=5)
        await connection.close()
    try:
        asyncio.run(ping())
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"RabbitMQ is not reachable at 127.0.0.1:5672 ({e!r}); start it with `rabbitmq-server -detached`")


@pytest.fixture
def service(rigdir):
    """The local compute service on :5000 (tests/rigs/service.py), stopped afterwards."""
    svc = LocalService(rigdir)
    yield svc
    svc.stop()


@pytest.fixture
def mep(rigdir, service):
    """Start MEPs that register with `service` and run the real UEP (live_mep)."""
    yield from many(lambda **kw: live_mep(rigdir, service, **kw))


@pytest.fixture
def live(rigdir):
    """Start LiveMEPs (tests/rigs/mep.py); each is stopped and removed afterwards."""
    yield from many(lambda **kw: LiveMEP(rigdir, **kw))


@pytest.fixture(scope="session")
def slurm_cluster():
    """The single-node Slurm cluster (tests/rigs/slurm.py), up for the whole session.
    Without Slurm or root it skips; under CI=true it fails instead."""
    why = why_not_available()
    if why:
        if IN_CI:
            pytest.fail(f"{why}, and CI=true forbids skipping a test that needs Slurm")
        pytest.skip(why)
    cluster = Cluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm(slurm_cluster):
    """The cluster for one test; every job the test leaves is cancelled after it."""
    yield slurm_cluster
    slurm_cluster.cancel_all()
