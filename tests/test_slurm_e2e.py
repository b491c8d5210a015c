"""End to end on a real batch scheduler: the real SDK Executor -> the local compute service
-> the MEP -> the real UEP as the mapped user -> Parsl's SlurmProvider -> sbatch, as that
user -> a Slurm job of that user on the single-node cluster (tests/rigs/slurm.py) -> the
task runs there and its result comes back.

The MEP's template is docs/examples/user_config_template.slurm.yaml.j2, unchanged; the
administrator's user_environment.yaml gives every UEP SLURM_CONF, as a site whose
slurm.conf is not in /etc/slurm would.
"""

import concurrent.futures
import json
import os
import signal
from pathlib import Path

import pytest

from tests.rigs import procs
from tests.rigs.accounts import pam_service
from tests.rigs.mep import many
from tests.rigs.procs import wait_for
from tests.rigs.service import UEP_PROGRAM, live_mep, run_sdk, uep_pids

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.slurm,
              pytest.mark.usefixtures("no_strays", "rabbitmq")]

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
TEMPLATE = (EXAMPLES / "user_config_template.slurm.yaml.j2").read_text()
SCHEMA = json.loads((EXAMPLES / "user_config_schema.slurm.json").read_text())
ALICE, BOB = "mept-alice@example.org", "mept-bob@example.org"
ACCOUNT = "mept-proj"

WHERE = """
def where(x):
    import os, pwd
    return {"user": pwd.getpwuid(os.getuid()).pw_name, "uid": os.getuid(), "job": os.environ.get("SLURM_JOB_ID"),
            "x": x * 2}
"""


@pytest.fixture
def mep(rigdir, service, slurm):
    launcher = Path(__file__).resolve().parent.parent / "scripts" / "uep-start.sh"
    assert Path(UEP_PROGRAM).read_text() == launcher.read_text(), \
        f"{UEP_PROGRAM} is not this checkout's scripts/uep-start.sh (it tags batch jobs): run scripts/setup.sh"
    def start(**kw):
        # a UEP with a live block takes longer than this to end on TERM: the stop then KILLs it
        config = {"mu_child_ep_grace_period_s": 5, **kw.pop("config", {})}
        return live_mep(rigdir, service, template=TEMPLATE, schema=SCHEMA, config=config,
                                environment={"SLURM_CONF": str(slurm.conf)}, **kw)
    yield from many(start)


def run(service, m, user, body: str, opts: dict | None = None, timeout: float = 150) -> dict:
    """Run `body` (inside `with Executor(...) as ex:`) as `user` with these user options."""
    opts = {"ACCOUNT_ID": ACCOUNT, **(opts or {})}
    script = WHERE + f"""
with Executor(endpoint_id={m.endpoint_id!r}, client=client, user_endpoint_config={opts!r}) as ex:
{body}
"""
    return run_sdk(service, user, script, timeout=timeout)


RESULT = "    print(json.dumps(ex.submit(where, 21).result(timeout=120)))"


def no_jobs_of(slurm, user: str, timeout: float = 10.0) -> bool:
    try:
        wait_for(lambda: not slurm.jobs(user), timeout=timeout, interval=0.2, what=f"{user}'s jobs to end")
        return True
    except AssertionError:
        return False


def completion(slurm, job: str, timeout: float = 15.0) -> dict:
    """The job completion log's record of `job` (written when the job has ended)."""
    return wait_for(lambda: next((r for r in slurm.completed() if r["JobId"] == job), None),
                            timeout=timeout, what=f"job {job} in the completion log")


def uep_log(user: str = "mept-alice") -> str:
    return "".join(p.read_text() for p in Path(f"/home/{user}/.globus_compute").glob("*/endpoint.log"))


def no_new_privs(pid: int) -> str:
    return procs.proc_status_field(pid, "NoNewPrivs")


@pytest.mark.parametrize("pam", [False, True], ids=["pam-off", "pam-on"])
def test_the_task_runs_in_a_slurm_job_of_the_mapped_user(service, mep, slurm, accounts, pam):
    """The result carries the user's uid and the job id; Slurm says the job is that user's,
    and when the MEP stops, the job is cancelled and logged as that user's."""
    policy = {}
    if pam:
        policy["pam"] = {"enabled": True, "service": pam_service(
            "slurm", "auth required pam_permit.so\naccount required pam_unix.so\nsession required pam_unix.so\n")}
    m = mep(policy=policy)
    got = run(service, m, ALICE, RESULT)
    assert got["user"] == "mept-alice" and got["uid"] == accounts.alice.pw_uid and got["x"] == 42
    assert got["job"] and got["job"].isdigit()
    [uep] = uep_pids(m)
    assert no_new_privs(uep) == ("0" if pam else "1")
    jobs = slurm.jobs()
    assert [(j["id"], j["user"], j["account"]) for j in jobs] == [(got["job"], "mept-alice", ACCOUNT)]
    assert m.stop() == 0, m.output()[-2000:] + uep_log()[-6000:]
    assert no_jobs_of(slurm, "mept-alice"), slurm.jobs()
    record = completion(slurm, got["job"])
    assert record["UserId"] == f"mept-alice({accounts.alice.pw_uid})" and record["Account"] == ACCOUNT
    assert record["JobState"] == "CANCELLED"


def test_two_users_at_once_get_separate_jobs(service, mep, slurm, accounts):
    m = mep()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        alice, bob = pool.map(lambda u: run(service, m, u, RESULT), [ALICE, BOB])
    assert (alice["user"], alice["uid"]) == ("mept-alice", accounts.alice.pw_uid)
    assert (bob["user"], bob["uid"]) == ("mept-bob", accounts.bob.pw_uid)
    assert alice["job"] != bob["job"]
    owners = {j["id"]: j["user"] for j in slurm.jobs()}
    assert owners == {alice["job"]: "mept-alice", bob["job"]: "mept-bob"}


def test_max_idletime_scales_the_block_down_and_the_job_ends(service, mep, slurm, accounts):
    """With MAX_IDLETIME=2 the idle block is cancelled by the UEP itself, which keeps running."""
    m = mep()
    got = run(service, m, ALICE, RESULT, opts={"MAX_IDLETIME": 2})
    [uep] = uep_pids(m)
    assert no_jobs_of(slurm, "mept-alice", timeout=60), slurm.jobs()
    assert procs.alive(uep) and "user endpoint exited" not in m.output()  # the UEP scaled in; it did not end
    record = completion(slurm, got["job"])
    assert record["UserId"] == f"mept-alice({accounts.alice.pw_uid})"


def test_a_sigkilled_uep_leaves_no_batch_job(service, mep, slurm):
    """SIGKILL gives the UEP no chance to cancel its block: the MEP cancels it, as the user."""
    m = mep()
    got = run(service, m, ALICE, RESULT)
    [uep] = uep_pids(m)
    assert [j["id"] for j in slurm.jobs("mept-alice")] == [got["job"]]
    os.kill(uep, signal.SIGKILL)
    wait_for(lambda: "user endpoint exited" in m.output(), what="the MEP to see the exit")
    assert no_jobs_of(slurm, "mept-alice", timeout=10), f"{slurm.jobs()}\n{m.output()[-3000:]}"
    assert completion(slurm, got["job"])["JobState"] == "CANCELLED"
    assert "batch jobs of the user endpoint cancelled" in m.output()


def test_a_nonexistent_partition_fails_the_future_with_slurms_reason(service, mep, slurm):
    """Not a silent hang: the scheduler's refusal reaches the user's future. (Without an
    accounting database this cluster takes any account, so the refused value is the
    partition: docs/decisions.md, "The Slurm test cluster".)"""
    m = mep()
    body = """    try:
        ex.submit(where, 1).result(timeout=120)
        print(json.dumps({"error": None}))
    except Exception as e:
        print(json.dumps({"type": type(e).__name__, "error": str(e)}))"""
    out = run(service, m, ALICE, body, opts={"PARTITION": "nosuch"})
    # the UEP's engine fails the task with sbatch's own words (Parsl's BadStateException)
    assert out["type"] == "TaskExecutionFailed", out
    assert "sbatch: error: Batch job submission failed: Invalid partition name specified" in out["error"], out
    assert slurm.jobs() == []


def test_a_uep_started_before_a_reload_still_leaves_no_batch_job(service, mep, slurm):
    """SIGHUP re-execs the broker in place (broker/reexec.py); the mark that the UEP runs
    Slurm jobs travels with its record, so its jobs are still cancelled after a SIGKILL."""
    m = mep()
    got = run(service, m, ALICE, RESULT)
    [uep] = uep_pids(m)
    os.kill(m.broker_pid(), signal.SIGHUP)
    wait_for(lambda: "broker re-executed in place" in m.output(), what="the re-exec")
    assert [j["id"] for j in slurm.jobs("mept-alice")] == [got["job"]]
    os.kill(uep, signal.SIGKILL)
    assert no_jobs_of(slurm, "mept-alice", timeout=10), f"{slurm.jobs()}\n{m.output()[-3000:]}"
