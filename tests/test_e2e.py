"""End to end, no Globus cloud: the real SDK Executor -> the local compute service ->
RabbitMQ -> the MEP (root helper + broker) -> the real globus-compute-endpoint UEP as the
mapped user -> results back to the submitting user only."""

import asyncio
import base64
import concurrent.futures
import json
import os
import pathlib
import re
import signal
import urllib.request

import aio_pika
import aiormq
import pytest

from tests.rigs import procs
from tests.rigs.procs import wait_for
from tests.rigs.service import run_sdk, uep_pids, wait_for_uep

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.usefixtures("no_strays", "rabbitmq")]

WHOAMI = """
def whoami(x):
    import os, pwd
    return {"user": pwd.getpwuid(os.getuid()).pw_name, "uid": os.getuid(), "pid": os.getpid(), "x": x * 2}
"""


def run(service, m, user, body: str) -> dict:
    """Run `body` (indented, inside `with Executor(...) as ex:`) as `user`; it prints JSON."""
    script = WHOAMI + f"""
with Executor(endpoint_id={m.endpoint_id!r}, client=client) as ex:
{body}
"""
    return run_sdk(service, user, script)


def started(m) -> list:
    return uep_pids(m)


def test_two_users_run_in_parallel_as_their_own_uids(service, mep, accounts):
    m = mep()
    body = "    print(json.dumps(ex.submit(whoami, 21).result(timeout=90)))"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        alice, bob = pool.map(lambda u: run(service, m, u, body), ["mept-alice@example.org", "mept-bob@example.org"])
    assert alice == {"user": "mept-alice", "uid": accounts.alice.pw_uid, "pid": alice["pid"], "x": 42}
    assert bob == {"user": "mept-bob", "uid": accounts.bob.pw_uid, "pid": bob["pid"], "x": 42}
    assert sorted([alice["pid"], bob["pid"]]) == sorted(started(m))  # each ran inside its own UEP


def test_second_submission_reuses_the_running_uep_and_refreshes_its_credentials(service, mep):
    m = mep()
    body = "    print(json.dumps(ex.submit(whoami, 1).result(timeout=90)))"
    first = run(service, m, "mept-alice@example.org", body)
    second = run(service, m, "mept-alice@example.org", body)
    assert first["pid"] == second["pid"] and started(m) == [first["pid"]]
    assert "user endpoint already running; credentials refreshed" in m.output()


def test_rotated_credentials_reach_the_running_uep_through_the_memfd(service, mep):
    """Every submission gives the UEP's RabbitMQ account a new password; the MEP writes the
    new credentials into the running UEP's memfd. Cut the UEP's connections: it must
    reconnect with what the memfd holds now, since the old password no longer works."""
    m = mep()
    body = "    print(json.dumps(ex.submit(whoami, 1).result(timeout=90)))"
    first = run(service, m, "mept-alice@example.org", body)
    second = run(service, m, "mept-alice@example.org", body)
    wait_for(lambda: "credentials refreshed" in m.output(), what="the refresh")
    uep = json.loads(m.mepctl("list", "--json").stdout)["user_endpoints"][0]["name"]
    listed = procs.run("rabbitmqctl", "-q", "list_connections", "user", "pid").stdout.splitlines()
    connections = [line.split("\t")[1] for line in listed if line.startswith(f"uep-{uep}\t")]
    assert len(connections) >= 2, listed  # task subscriber, result and heartbeat publishers
    for pid in connections:
        procs.run("rabbitmqctl", "-q", "close_connection", pid, "test: reconnect with the current credentials")
    third = run(service, m, "mept-alice@example.org", body)
    assert first["pid"] == second["pid"] == third["pid"] and started(m) == [first["pid"]]
    listed = procs.run("rabbitmqctl", "-q", "list_connections", "user", "pid").stdout.splitlines()
    again = {line.split("\t")[1] for line in listed if line.startswith(f"uep-{uep}\t")}
    assert again and not again & set(connections)  # new connections, made with the new password


def test_user_endpoint_config_reaches_the_uep(service, mep):
    """max_workers from the user's config: 3 tasks overlap in 3 threads, or run in 1."""
    m = mep()
    body = """    def thread(_):
        import threading, time
        time.sleep(1)
        return threading.current_thread().name
    ex.user_endpoint_config = {{"max_workers": {n}}}
    names = [f.result(timeout=90) for f in [ex.submit(thread, i) for i in range(3)]]
    print(json.dumps({{"threads": len(set(names))}}))"""
    assert run(service, m, "mept-alice@example.org", body.format(n=3)) == {"threads": 3}
    assert run(service, m, "mept-alice@example.org", body.format(n=1)) == {"threads": 1}
    assert len(started(m)) == 2  # another config, another UEP id, another UEP


def test_a_uep_killed_by_hand_is_restarted_by_the_next_task(service, mep):
    m = mep()
    body = "    print(json.dumps(ex.submit(whoami, 1).result(timeout=90)))"
    first = run(service, m, "mept-alice@example.org", body)
    os.killpg(first["pid"], signal.SIGKILL)
    wait_for(lambda: "user endpoint exited" in m.output(), what="the MEP to see the exit")
    second = run(service, m, "mept-alice@example.org", body)
    assert second["pid"] != first["pid"] and started(m) == [first["pid"], second["pid"]]


def test_an_exception_in_the_function_comes_back_to_the_user(service, mep):
    m = mep()
    body = """    def boom(x):
        raise ValueError(f"bad input {x}")
    try:
        ex.submit(boom, 7).result(timeout=90)
        print(json.dumps({"error": None}))
    except Exception as e:
        print(json.dumps({"type": type(e).__name__, "error": str(e)}))"""
    out = run(service, m, "mept-alice@example.org", body)
    assert out["type"] == "TaskExecutionFailed" and "ValueError: bad input 7" in out["error"]


def test_unmapped_identity_fails_the_future_with_the_meps_message(service, mep):
    m = mep()
    body = """    try:
        ex.submit(whoami, 1).result(timeout=60)
        print(json.dumps({"error": None}))
    except Exception as e:
        print(json.dumps({"error": str(e)}))"""
    out = run(service, m, "eve@elsewhere.org", body)
    assert "Identity failed to map to a local user name." in out["error"]
    assert started(m) == []


def test_allowed_functions_are_enforced_at_submit(service, mep):
    register = WHOAMI + """
def other(x):
    return x
print(json.dumps({"ok": client.register_function(whoami), "no": client.register_function(other)}))
"""
    ids = run_sdk(service, "mept-alice@example.org", register)
    m = mep(config={"allowed_functions": [ids["ok"]]})
    body = f"""    ok = ex.submit_to_registered_function({ids["ok"]!r}, args=(5,)).result(timeout=90)
    try:
        ex.submit_to_registered_function({ids["no"]!r}, args=(5,)).result(timeout=60)
        refused = None
    except Exception as e:
        refused = str(e)
    print(json.dumps({{"ok": ok["x"], "refused": refused}}))"""
    out = run(service, m, "mept-alice@example.org", body)
    assert out["ok"] == 10
    assert "403" in out["refused"] and "FUNCTION_NOT_PERMITTED" in out["refused"]
    assert f"Function {ids['no']} not permitted on endpoint {m.endpoint_id}" in out["refused"]


def test_one_user_cannot_read_another_users_results(service, mep):
    m = mep()
    body = """    f = ex.submit(whoami, 1)
    f.result(timeout=90)
    print(json.dumps({"task_group": str(ex.task_group_id), "url": client.get_result_amqp_url()}))"""
    alice = run(service, m, "mept-alice@example.org", body)
    bob = run(service, m, "mept-bob@example.org", body)
    alice_queue = alice["url"]["queue_prefix"] + alice["task_group"]
    assert bob["url"]["queue_prefix"] != alice["url"]["queue_prefix"]

    async def consume(url, queue):
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            try:
                await (await channel.declare_queue(queue, passive=True)).get(fail=False)
                return "read"
            except aiormq.exceptions.ChannelAccessRefused:
                return "refused"
    assert asyncio.run(consume(bob["url"]["connection_url"], alice_queue)) == "refused"
    assert asyncio.run(consume(alice["url"]["connection_url"], alice_queue)) == "read"
    # and each UEP's own account may read its own task queue and nothing else
    ueps = {u["user"]: u["name"] for u in json.loads(m.mepctl("list", "--json").stdout)["user_endpoints"]}
    for user, uep in ueps.items():
        perms = management(f"/api/permissions/%2F/uep-{uep}")
        other = next(u for n, u in ueps.items() if n != user)
        assert re.fullmatch(perms["read"], f"uep.{uep}.tasks") and not re.fullmatch(perms["read"], f"uep.{other}.tasks")
        assert perms["configure"] == "^$" and not re.fullmatch(perms["write"], f"uep.{other}.results")


def test_mep_stopped_mid_task_leaves_no_uep_and_fails_the_future(service, mep):
    m = mep()
    body = """    import time
    def slow():
        import time
        time.sleep(60)
    f = ex.submit(slow)
    while not os.path.exists(os.environ["HOME"] + "/go"):
        time.sleep(0.1)
    try:
        f.result(timeout=60)
        print(json.dumps({"error": None}))
    except Exception as e:
        print(json.dumps({"error": str(e)}))"""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run, service, m, "mept-alice@example.org", body)
        pids = wait_for_uep(m, 1)
        wait_for(lambda: "Preparing to execute task" in uep_log(), what="the task to run")
        assert m.stop() == 0
        (service.dir / "go").touch()
        out = future.result(timeout=120)
    assert procs.wait_gone(pids) == []
    assert "The multi-user endpoint is shutting down and stopped this user endpoint" in out["error"]


def management(path: str) -> dict:
    """GET from RabbitMQ's management API as guest."""
    request = urllib.request.Request(f"http://127.0.0.1:15672{path}",
                                     headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)


def uep_log() -> str:
    return "".join(p.read_text() for p in pathlib.Path("/home/mept-alice/.globus_compute").glob("*/endpoint.log"))


def test_idle_uep_stops_and_the_next_task_starts_a_fresh_one(service, mep):
    m = mep()
    body = """    ex.user_endpoint_config = {"heartbeat_period": 5, "idle_heartbeats_soft": 1, "idle_heartbeats_hard": 2}
    print(json.dumps(ex.submit(whoami, 1).result(timeout=90)))"""
    first = run(service, m, "mept-alice@example.org", body)
    wait_for(lambda: "user endpoint exited" in m.output(), timeout=60, what="the idle UEP to stop")
    assert procs.wait_gone([first["pid"]]) == []
    second = run(service, m, "mept-alice@example.org", body)
    assert second["pid"] != first["pid"] and len(started(m)) == 2



PARSL_TEMPLATE = """\
engine:
  type: GlobusComputeEngine
  max_workers_per_node: 2
  provider:
    type: LocalProvider
    init_blocks: 1
    min_blocks: 0
    max_blocks: 1
heartbeat_period: 5
"""


def test_parsl_globus_compute_engine_with_a_local_provider(service, mep, accounts):
    """The template runs Parsl's engine; stopping the MEP leaves none of its worker pool
    (started in its own process group, so killing the UEP's group misses it; the session
    process, as subreaper, catches it)."""
    # Parsl's engine does not finish a TERM shutdown within the default 30 s grace; 5 s
    # makes the MEP's KILL path (and the subreaper) do the work within the test
    m = mep(template=PARSL_TEMPLATE, config={"mu_child_ep_grace_period_s": 5})
    out = run(service, m, "mept-bob@example.org", "    print(json.dumps(ex.submit(whoami, 4).result(timeout=150)))")
    assert out["user"] == "mept-bob" and out["uid"] == accounts.bob.pw_uid and out["x"] == 8
    assert out["pid"] not in started(m)  # a Parsl worker process, not the UEP itself
    workers = procs.processes_of(accounts.bob.pw_name)
    assert len(workers) > 3 and len({os.getpgid(p) for p in workers if os.path.exists(f"/proc/{p}")}) > 1
    assert m.stop() == 0
    assert procs.wait_gone(workers) == []
