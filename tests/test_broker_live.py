"""The broker end to end with real parts: RabbitMQ on 127.0.0.1, the root helper in
--launch mode, the broker as mept-broker, real accounts, the probe as the UEP program.
Commands are published in upstream's format; what the UEP got is read from inside it."""

import json
import os

import pytest
import yaml
from cryptography.fernet import Fernet

from tests.rigs import procs
from tests.rigs.mep import idmap_expression
from tests.rigs.procs import wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays", "rabbitmq")]


def test_start_command_spawns_the_mapped_user_with_upstreams_stdin_document(live, accounts):
    mep = live()
    cmd = mep.command("mept-alice@example.org", user_opts={"max_workers": 3})
    mep.publish(cmd)
    seen = mep.report()[0]
    assert seen["resuid"] == [accounts.alice.pw_uid] * 3
    assert seen["argv"][1:] == ["start", cmd["kwargs"]["name"]]
    doc = json.loads(seen["stdin"])
    assert set(doc) == {"amqp_creds", "config", "ep_info", "mem_fd", "enckey"}
    assert doc["amqp_creds"] == cmd["kwargs"]["amqp_creds"] and doc["mem_fd"] == 3
    config = yaml.safe_load(doc["config"])
    assert config["engine"] == {"type": "ThreadPoolEngine", "max_workers": 3}
    assert config["display_name"] == "mept-alice"
    assert doc["ep_info"]["globus_matched_identity"] == cmd["globus_identity_set"][0]["id"]
    assert doc["ep_info"]["globus_candidate_identities"] == [[{cmd["globus_identity_set"][0]["id"]: ["mept-alice"]}]]
    # the credential memfd holds upstream's Fernet token, readable with the enckey
    token = Fernet(doc["enckey"].encode()).decrypt(seen["cred"].encode())
    assert json.loads(token) == {"amqp_creds": cmd["kwargs"]["amqp_creds"]}
    assert seen["env"]["GLOBUS_COMPUTE_ENDPOINT_NAME"] == cmd["kwargs"]["name"]
    assert seen["env"]["PROBE_REPORT_DIR"] == str(mep.reports)  # from user_environment.yaml
    assert "user endpoint started" in mep.output()
    assert mep.notice(cmd, timeout=0.5) is None  # no failure notice for a success


def test_two_users_get_their_own_uids(live, accounts):
    mep = live()
    mep.publish(mep.command("mept-alice@example.org"))
    mep.publish(mep.command("mept-bob@example.org"))
    wait_for(lambda: len(mep.reports_now()) == 2, what="two UEPs")
    uids = sorted(r[0]["resuid"][0] for r in mep.reports_now().values())
    assert uids == sorted([accounts.alice.pw_uid, accounts.bob.pw_uid])


def test_unmapped_identity_gets_a_failure_notice(live):
    mep = live()
    cmd = mep.command("mallory@elsewhere.example")
    mep.publish(cmd)
    notice = mep.notice(cmd)
    assert notice is not None, mep.output()
    assert notice["message_type"] == "ep_status_report"
    assert notice["data"]["endpoint_id"] == cmd["kwargs"]["name"]
    assert notice["data"]["global_state"]["error"] == "Identity failed to map to a local user name."
    assert "no rule of" in mep.output() and "identity_mapping.json" in mep.output()
    assert mep.reports_now() == {}


def test_mapped_but_nonexistent_user_and_helper_refusal_reach_the_user(live):
    mep = live(idmap=[{"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": [
        {"source": "{username}", "match": r"ghost@example\.org", "output": "mept-ghost"},
        {"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}"}]}])
    ghost = mep.command("ghost@example.org")
    mep.publish(ghost)
    assert "local user does not exist. Local user name: mept-ghost" in mep.notice(ghost)["data"]["global_state"]["error"]
    system = mep.command("mept-sys@example.org")  # maps to a system account: the helper refuses it
    mep.publish(system)
    error = mep.notice(system)["data"]["global_state"]["error"]
    assert error.startswith("Unable to start user endpoint process for mept-sys [(uid-below-min)"), error
    assert error.endswith("see your system administrator]")


def test_template_and_schema_refusals(live):
    mep = live()
    bad = mep.command("mept-alice@example.org", user_opts={"max_workers": 100})
    mep.publish(bad)
    error = mep.notice(bad)["data"]["global_state"]["error"]
    assert "user config option max_workers is invalid" in error and "mept-alice" in error
    reserved = mep.command("mept-alice@example.org", user_opts={"_GC": "x"})
    mep.publish(reserved)
    assert "'_GC' is a reserved word" in mep.notice(reserved)["data"]["global_state"]["error"]
    # the template is re-read at each start: an admin's broken edit refuses the next start
    mep.write("user_config_template.yaml.j2", "engine: {{ required_option }}\n")
    missing = mep.command("mept-alice@example.org")
    mep.publish(missing)
    assert "missing required user config option" in mep.notice(missing)["data"]["global_state"]["error"]
    mep.write("user_config_template.yaml.j2", "high_assurance: false\nengine: {type: ThreadPoolEngine}\n")
    ha = mep.command("mept-alice@example.org")
    mep.publish(ha)
    assert "contact the endpoint administrator" in mep.notice(ha)["data"]["global_state"]["error"]
    assert "`high_assurance` may not be specified in the template" in mep.output()
    assert mep.reports_now() == {}


def test_malformed_commands_are_answered_and_the_broker_keeps_serving(live, accounts):
    mep = live()
    mep.publish(b"{not json")
    wrong_type = mep.command("mept-alice@example.org")
    mep.publish(wrong_type, content_type="text/plain")
    old = mep.command("mept-alice@example.org")
    import datetime
    mep.publish(old, timestamp=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=600))
    unknown = mep.command("mept-alice@example.org", command="cmd_rm_rf")
    mep.publish(unknown)
    assert "Command too old" in mep.notice(old)["data"]["global_state"]["error"]
    assert "Unknown or invalid command" in mep.notice(unknown)["data"]["global_state"]["error"]
    good = mep.command("mept-alice@example.org")
    mep.publish(good)
    assert mep.report()[0]["resuid"][0] == accounts.alice.pw_uid
    log = mep.output()
    assert "Unable to deserialize" in log and "content type 'text/plain'" in log


def test_second_start_refreshes_credentials_instead_of_spawning(live):
    mep = live(environment={"PROBE_ACTION": json.dumps({"cred_wait": 20, "sleep": 30})})
    first = mep.command("mept-alice@example.org")
    mep.publish(first)
    seen = mep.report()
    pid = seen[0]["pid"]
    enckey = json.loads(seen[0]["stdin"])["enckey"].encode()
    second = mep.command("mept-alice@example.org", name=first["kwargs"]["name"])
    second["kwargs"]["amqp_creds"]["token"] = "refreshed"
    mep.publish(second)
    refreshed = wait_for(lambda: len(r := mep.report(pid)) > 1 and r, what="the credential refresh")[1]
    assert json.loads(Fernet(enckey).decrypt(refreshed["cred"].encode()))["amqp_creds"]["token"] == "refreshed"
    assert list(mep.reports_now()) == [pid]  # no second UEP
    assert "credentials refreshed" in mep.output()


def test_start_that_arrives_while_a_uep_stops_is_replayed(live):
    mep = live(environment={"PROBE_ACTION": json.dumps({"sleep": 2})})
    first = mep.command("mept-alice@example.org")
    mep.publish(first)
    pid = mep.report()[0]["pid"]
    mep.publish(mep.command("mept-alice@example.org", name=first["kwargs"]["name"]))
    wait_for(lambda: "credentials refreshed" in mep.output(), what="the refresh")
    new = wait_for(lambda: [p for p in mep.reports_now() if p != pid], timeout=20, what="the replayed UEP")
    assert len(new) == 1
    assert "replaying the start" in mep.output()


def test_stop_signal_stops_every_uep(live, accounts):
    mep = live()
    mep.publish(mep.command("mept-alice@example.org"))
    mep.publish(mep.command("mept-bob@example.org"))
    wait_for(lambda: len(mep.reports_now()) == 2, what="two UEPs")
    pids = list(mep.reports_now())
    assert mep.stop() == 0, mep.output()
    assert procs.wait_gone(pids) == []
    assert "broker stopped" in mep.output()


def test_identity_mapping_hot_reload(live, accounts):
    mep = live()
    other = mep.command("mept-alice@other.example")
    mep.publish(other)
    assert mep.notice(other) is not None  # not mapped yet
    mep.write("identity_mapping.json.new", json.dumps(idmap_expression("other.example")))
    os.rename(mep.dir / "identity_mapping.json.new", mep.dir / "identity_mapping.json")
    wait_for(lambda: "identity mapping reloaded" in mep.output(), what="the reload")
    again = mep.command("mept-alice@other.example")
    mep.publish(again)
    assert mep.report()[0]["resuid"][0] == accounts.alice.pw_uid
    # an invalid edit keeps the mapping that works
    mep.write("identity_mapping.json", "[{\"DATA_TYPE\": ")
    wait_for(lambda: "is invalid; keeping the previous mapping" in mep.output(), what="the refusal to reload")
    third = mep.command("mept-bob@other.example")
    mep.publish(third)
    wait_for(lambda: len(mep.reports_now()) == 2, what="bob's UEP under the kept mapping")


def test_high_assurance_audit_log(live, accounts, rigdir):
    """Created 0600 by the broker, Begin/End sentinels, one line per record the UEP writes
    to its audit pipe (fd 4), with the UEP's uid, pid and id; the stdin document says
    audit_fd 4 and high_assurance is prefixed to the config."""
    audit_dir = rigdir.path / f"audit-{os.urandom(3).hex()}"
    audit_dir.mkdir()
    os.chown(audit_dir, accounts.broker.pw_uid, accounts.broker.pw_gid)
    audit_log = audit_dir / "audit.log"
    mep = live(config={"high_assurance": True, "subscription_id": "00000000-0000-0000-0000-000000000002",
                       "audit_log_path": str(audit_log)},
               environment={"PROBE_REPORT_DIR": "", "PROBE_ACTION": json.dumps({"sleep": 1})})
    cmd = mep.command("mept-alice@example.org")
    mep.publish(cmd)
    line = wait_for(lambda: [x for x in audit_log.read_text().splitlines() if " uep=" in x], what="an audit line")[0]
    st = os.stat(audit_log)
    assert (st.st_uid, st.st_mode & 0o777) == (accounts.broker.pw_uid, 0o600)
    record = json.loads(line.split(f"uep={cmd['kwargs']['name']} ", 1)[1])
    assert f"uid={accounts.alice.pw_uid} pid={record['pid']} uep=" in line
    doc = json.loads(record["stdin"])
    assert doc["audit_fd"] == 4 and doc["config"].startswith("high_assurance: true\n")
    assert mep.stop() == 0
    lines = audit_log.read_text().splitlines()
    assert lines[0].endswith("Begin MEP session =====") and lines[-1].endswith("End MEP session -----")
