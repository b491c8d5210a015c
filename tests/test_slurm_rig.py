"""The Slurm test cluster itself (tests/rigs/slurm.py): a user with no capabilities and
no-new-privileges submits through munge, the job runs as that user and is logged as
theirs, and cancel_all() leaves neither a job nor a process."""

import pytest

from tests.rigs import procs
from tests.rigs.procs import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slurm]


def test_a_user_under_no_new_privileges_submits_and_the_job_runs_as_that_user(slurm, accounts):
    carol = accounts.carol
    out = f"{carol.pw_dir}/slurm-rig-test.out"
    sub = slurm.run("sbatch", "--parsable", "--account=mept-proj", "-o", out, "--wrap",
                    "id -u; echo job=$SLURM_JOB_ID", user=carol.pw_name)  # sbatch runs under no-new-privileges
    job = sub.stdout.strip()
    assert job.isdigit(), sub
    record = wait_for(lambda: next((r for r in slurm.completed() if r["JobId"] == job), None),
                              timeout=30, what="the job's completion record")
    assert record["UserId"] == f"{carol.pw_name}({carol.pw_uid})" and record["JobState"] == "COMPLETED"
    lines = open(out).read().split()
    assert str(carol.pw_uid) in lines and f"job={job}" in lines


def test_cancel_all_leaves_no_job_and_no_process(slurm, accounts):
    carol = accounts.carol.pw_name
    for _ in range(2):
        slurm.run("sbatch", "--account=mept-proj", "-o", "/dev/null", "--wrap", "sleep 600", user=carol)
    wait_for(lambda: any(j["state"] == "RUNNING" for j in slurm.jobs(carol)), timeout=30, what="a running job")
    wait_for(lambda: procs.processes_of(carol), timeout=10, what="the job's processes")
    slurm.cancel_all()
    assert slurm.jobs() == []
    assert procs.wait_gone(procs.processes_of(carol), 10) == []
