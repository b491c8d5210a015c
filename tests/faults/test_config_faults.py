"""Broken configuration while the MEP runs (issue 7): the identity mapping replaced by an
invalid file, deleted, made unreadable; the template and the schema broken. Each time
the admin gets a clear log line, the user a clear notice where a start fails, and the MEP
goes on serving with what still works. Real helper, real broker, real RabbitMQ."""

import json
import os

import pytest

from tests.rigs.procs import wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays", "rabbitmq")]
PROBE_SHORT = {"PROBE_ACTION": json.dumps({"sleep": 1})}


def served(mep, user: str) -> int:
    """Publish a start for `user`; the uid its UEP ran as."""
    before = set(mep.reports_now())
    mep.publish(mep.command(user))
    new = wait_for(lambda: set(mep.reports_now()) - before, what=f"a UEP for {user}")
    return mep.reports_now()[new.pop()][0]["resuid"][0]


def test_identity_mapping_invalid_deleted_unreadable_keeps_the_old_mapping(live, accounts):
    mep = live(environment=PROBE_SHORT)
    path = mep.dir / "identity_mapping.json"
    good = path.read_text()
    for breakage, log_line in ((lambda: path.write_text('[{"DATA_TYPE": '), "is invalid; keeping the previous mapping"),
                               (lambda: path.unlink(), "identity mapping file is gone; keeping the previous mapping"),
                               (lambda: (path.write_text(good), os.chmod(path, 0o600)), "cannot read it")):
        count = mep.output().count(log_line)
        breakage()
        wait_for(lambda: mep.output().count(log_line) > count, what=f"the log line {log_line!r}")
        assert served(mep, "mept-alice@example.org") == accounts.alice.pw_uid  # the old mapping still maps
    os.chmod(path, 0o644)
    wait_for(lambda: "identity mapping reloaded" in mep.output(), what="the reload of the fixed file")


@pytest.mark.parametrize("broken, notice, detail", [
    ("user_config_template.yaml.j2", "the endpoint's user config template is broken",
     "TemplateSyntaxError"),
    ("user_config_schema.json", "the endpoint's user config schema is broken", "cannot load the schema"),
])
def test_broken_template_or_schema_refuses_with_a_notice_and_the_mep_keeps_serving(live, accounts, broken, notice,
                                                                                    detail):
    mep = live(environment=PROBE_SHORT)
    good = (mep.dir / broken).read_text()
    mep.write(broken, "{% if %}" if broken.endswith(".j2") else "{not json")
    cmd = mep.command("mept-alice@example.org")
    mep.publish(cmd)
    error = mep.notice(cmd)["data"]["global_state"]["error"]
    assert error.startswith("Unable to start user endpoint process for mept-alice") and notice in error
    assert "contact the endpoint administrator" in error
    assert detail in mep.output() and broken in mep.output()  # the admin is told which file and why
    mep.write(broken, good)  # re-read at the next start: no restart needed
    assert served(mep, "mept-bob@example.org") == accounts.bob.pw_uid
    assert mep.proc.poll() is None
