"""The audit log of a high-assurance MEP on a full, then a read-only, file system (a small
tmpfs of the test's own): the MEP marks the log broken, logs why, and refuses every new
start with a notice rather than run tasks it cannot account for (docs/decisions.md);
records are never dropped silently."""

import json
import os
import subprocess

import pytest

from tests.rigs import procs
from tests.rigs.mep import LiveMEP
from tests.rigs.procs import wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays", "rabbitmq")]
HA = {"high_assurance": True, "subscription_id": "00000000-0000-0000-0000-000000000002"}


@pytest.fixture
def small_fs(rigdir, accounts):
    path = rigdir.path / f"auditfs-{os.urandom(3).hex()}"
    path.mkdir()
    procs.run("mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(path))
    os.chown(path, accounts.broker.pw_uid, accounts.broker.pw_gid)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_audit_log_on_a_full_file_system_refuses_new_starts_with_a_notice(live, accounts, small_fs):
    audit = small_fs / "audit.log"
    mep = live(config={**HA, "audit_log_path": str(audit)},
               environment={"PROBE_REPORT_DIR": "", "PROBE_ACTION": json.dumps({"sleep": 1})})
    mep.publish(mep.command("mept-alice@example.org"))
    wait_for(lambda: " uep=" in audit.read_text(), what="the first audit line")
    procs.run("dd", "if=/dev/zero", f"of={small_fs / 'filler'}", "bs=4k", "count=64", check=False)
    for _ in range(10):  # each UEP writes one record to its audit pipe; soon one does not fit
        mep.publish(mep.command("mept-bob@example.org"))
        try:
            wait_for(lambda: "audit log write failed" in mep.output(), timeout=3, what="the broken-log line")
            break
        except AssertionError:
            continue
    assert "audit log write failed; refusing high-assurance starts" in mep.output()
    refused = mep.command("mept-bob@example.org")
    mep.publish(refused)
    notice = mep.notice(refused)["data"]["global_state"]["error"]
    assert "the endpoint's audit log is unavailable; contact the endpoint administrator" in notice
    assert "audit log broken" in mep.output()
    assert mep.proc.poll() is None  # the MEP keeps running; it refuses only what it cannot audit


def test_audit_log_on_a_read_only_file_system_stops_the_mep_at_start(rigdir, accounts, small_fs):
    procs.run("mount", "-o", "remount,ro", str(small_fs))
    with pytest.raises(AssertionError, match="MEP ended at start") as failed:
        LiveMEP(rigdir, config={**HA, "audit_log_path": str(small_fs / "audit.log")})
    assert "cannot open the audit log; a high-assurance MEP does not start without it" in str(failed.value)
    assert "Read-only file system" in str(failed.value)
