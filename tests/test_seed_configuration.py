"""The seed chapter's configuration files, as an administrator writes them (issue 16):
its identity mapping example, its `pam:` snippet, its `user_environment.yaml`. Each test
runs a live MEP (root helper, broker, RabbitMQ) and checks from outside: the UEP's own
/proc status as the probe reports it, a pam_exec log, the MEP's log.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets

import pytest

from broker import seed
from tests.rigs import procs
from tests.rigs.accounts import PAM_DIR, pam_service
from tests.rigs.procs import wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays", "rabbitmq")]


# -- "Identity Mapping": the default example, "/bin/false ... will be ignored" ----------------------

def test_the_default_identity_mapping_skips_the_failing_mapper_and_maps(live, accounts):
    example = json.loads(seed.IDMAP_EXAMPLE)
    assert example[0]["command"][0] == "/bin/false" and example[1]["mappings"][0]["match"] == "(.*)@example.com"
    mep = live(idmap=example)
    mep.publish(mep.command("mept-alice@example.com"))
    seen = mep.report()[0]
    assert seen["resuid"] == [accounts.alice.pw_uid] * 3
    log = mep.output()
    assert "identity mapper failed; trying the next one" in log
    assert "mapper 1 of 2 (external_identity_mapping#1.0.0)" in log
    assert "Unhandled error attempting to map" not in log


# -- "PAM": the seed's snippet in config.yaml -----------------------------------------------------

@pytest.fixture
def pam_log(rigdir):
    tag = secrets.token_hex(3)
    log = rigdir.path / f"seed-pam-{tag}.log"
    hook = rigdir.file(f"seed-pam-{tag}.sh", f'#!/bin/sh\necho "$PAM_TYPE $PAM_USER $PAM_SERVICE" >> {log}\n', mode=0o755)
    service = pam_service(f"seed-{tag}", "auth required pam_permit.so\naccount required pam_unix.so\n"
                                             f"session required pam_exec.so {hook}\nsession required pam_permit.so\n")
    yield service, log
    (PAM_DIR / service).unlink(missing_ok=True)


def test_the_seeds_pam_snippet_with_the_policy_that_agrees_runs_pam(live, accounts, pam_log):
    service, log = pam_log
    mep = live(config={"pam": {"enable": True, "service_name": service}},
               policy={"pam": {"enabled": True, "service": service}})
    mep.publish(mep.command("mept-alice@example.org"))
    seen = mep.report()[0]
    assert seen["no_new_privs"] == 0  # PAM on: NO_NEW_PRIVS is the policy's, off by default
    wait_for(lambda: log.exists() and f"open_session mept-alice {service}" in log.read_text(), what="the PAM session")


@pytest.mark.parametrize("config_pam, policy_pam, words", [
    ({"enable": True, "service_name": "PAMSERVICE"}, None, "says PAM on with service 'PAMSERVICE'"),
    ({"enable": False}, {"enabled": True, "service": "PAMSERVICE"}, "policy says PAM on with service 'PAMSERVICE'"),
    ({"enable": True, "service_name": "other"}, {"enabled": True, "service": "PAMSERVICE"}, "'other'"),
])
def test_pam_in_config_yaml_that_the_policy_does_not_say_refuses_the_start(live, pam_log, config_pam, policy_pam,
                                                                           words):
    service, _ = pam_log
    config_pam = {k: (service if v == "PAMSERVICE" else v) for k, v in config_pam.items()}
    policy = {"pam": {k: (service if v == "PAMSERVICE" else v) for k, v in policy_pam.items()}} if policy_pam else {}
    with pytest.raises(AssertionError, match="MEP ended at start") as ended:
        live(config={"pam": config_pam}, policy=policy)
    said = str(ended.value)
    assert words.replace("PAMSERVICE", service) in said, said
    assert "config.yaml" in said and "helper-policy.toml" in said and "the policy decides" in said


# -- "user_environment.yaml": site variables, LD_LIBRARY_PATH included -----------------------------

def test_site_library_paths_reach_the_uep_once_the_policy_allows_them(live, accounts):
    site = {"LD_LIBRARY_PATH": "/opt/site/lib", "SITE_SPECIFIC_VAR": "--additional_flag_for_frobnicator"}
    mep = live(environment=site, policy={"env_allow": ["LD_LIBRARY_PATH"]})
    mep.publish(mep.command("mept-alice@example.org"))
    env = mep.report()[0]["env"]
    assert env["LD_LIBRARY_PATH"] == "/opt/site/lib" and env["SITE_SPECIFIC_VAR"] == site["SITE_SPECIFIC_VAR"]
    refused = live(environment=site)  # without env_allow: the user is told which variable and how to allow it
    cmd = refused.command("mept-alice@example.org")
    refused.publish(cmd)
    error = refused.notice(cmd)["data"]["global_state"]["error"]
    assert "(env-denied)" in error and "'LD_LIBRARY_PATH'" in error and "env_allow" in error


# -- "Configuring a MEP": endpoint names as upstream checks them -----------------------------------

@pytest.mark.parametrize("name", [" has_a_space", "has a_space", "we_don't_accept_single_quotes",
                                  'we_do_not_accept_"double_quotes"', "we_\\_do_not_accept_escapes", ".hidden", "a" * 129,
                                  "d9ff80b0-0000-4000-8000-000000000001"])
def test_configure_refuses_the_names_upstream_refuses(rigdir, accounts, name):
    from tests.test_configure import mepctl
    croot = rigdir.path / f"names-{secrets.token_hex(3)}"
    try:
        out = mepctl(rigdir, "configure", "--multi-user", name, "--config-root", str(croot),
                     "--broker-user", accounts.broker.pw_name, "--uep-executable", str(rigdir.probe))
        assert out.returncode != 0 and "Invalid endpoint name" in out.stderr + out.stdout, out
        assert not (croot / name).exists()
    finally:
        procs.run("rm", "-rf", str(croot))


# -- "user_config_schema.json" / templates: the files as upstream reads them -----------------------

def test_a_named_schema_that_is_missing_refuses_the_config(live, rigdir):
    with pytest.raises(AssertionError, match="MEP ended at start") as ended:
        live(config={"user_config_schema_path": str(rigdir.path / "no-such-schema.json")})
    assert "user_config_schema_path names" in str(ended.value) and "does not exist" in str(ended.value)


def test_parent_config_is_the_whole_mep_config(live, accounts):
    """Upstream's templates may read any MEP setting through parent_config."""
    template = ("engine:\n  type: ThreadPoolEngine\ndisplay_name: {{ parent_config.display_name }}\n"
                "heartbeat_period: {{ parent_config.heartbeat_period | default(30) }}\n"
                "idle_heartbeats_soft: {{ parent_config.mu_child_ep_grace_period_s | int }}\n")
    mep = live(template=template, config={"mu_child_ep_grace_period_s": 7})
    mep.publish(mep.command("mept-alice@example.org"))
    config = json.loads(mep.report()[0]["stdin"])["config"]
    assert f"display_name: test MEP {mep.tag}" in config and "idle_heartbeats_soft: 7" in config, config


# -- "Configuration": configure as the chapter runs it, as root, with no --config-root -------------

def test_configure_as_root_with_no_config_root_makes_a_directory_start_accepts(rigdir, accounts):
    from broker.config import load_config
    from privhelper.policy import load_policy
    from tests.test_configure import mepctl
    name = f"mept-seed-{secrets.token_hex(3)}"
    conf_dir = pathlib.Path("/etc/globus-compute") / name
    try:
        out = mepctl(rigdir, "configure", "--multi-user", name, "--broker-user", accounts.broker.pw_name,
                     "--uep-executable", str(rigdir.probe), "--subscription-id", "00000000-0000-0000-0000-00000000000a",
                     "--auth-policy", "00000000-0000-0000-0000-00000000000b")
        assert out.returncode == 0, out.stderr
        assert f"mepctl start {name}\n" in out.stdout + "\n" and "--config-root" not in out.stdout
        load_policy(str(conf_dir / "helper-policy.toml"))  # the helper's own checks, the trusted path included
        config = load_config(conf_dir)
        assert config.display_name is None  # the seed's `display_name: null`
        assert config.amqp_port == 443  # the seed's `amqp_port: 443`
        assert config.subscription_id == "00000000-0000-0000-0000-00000000000a"  # written without high assurance
        assert config.authentication_policy == "00000000-0000-0000-0000-00000000000b"
    finally:
        procs.run("rm", "-rf", str(conf_dir))


def test_configure_refuses_a_config_root_the_helper_would_refuse(rigdir, accounts):
    from tests.test_configure import mepctl
    sticky = rigdir.path / f"sticky-{secrets.token_hex(3)}"
    sticky.mkdir(mode=0o1777)
    os.chmod(sticky, 0o1777)  # like /tmp
    try:
        out = mepctl(rigdir, "configure", "--multi-user", "x", "--config-root", str(sticky),
                     "--broker-user", accounts.broker.pw_name, "--uep-executable", str(rigdir.probe))
        assert out.returncode != 0 and "writable by group or others" in out.stderr + out.stdout, out
        assert "the root helper would refuse to start from there" in out.stderr + out.stdout
        assert not (sticky / "x").exists()
    finally:
        procs.run("rm", "-rf", str(sticky))


# -- "High-Assurance": fixed at registration ------------------------------------------------------

def test_high_assurance_cannot_be_toggled_by_editing_config_yaml_and_restarting(service, mep):
    m = mep()
    assert json.loads((m.dir / "run" / "endpoint.json").read_text())["high_assurance"] is False
    m.stop()
    config = json.loads((m.dir / "config.yaml").read_text())
    config.update(high_assurance=True, subscription_id="00000000-0000-0000-0000-000000000002")
    (m.dir / "config.yaml").write_text(json.dumps(config))
    m.helper_log = open(m.helper_log_path, "a")
    m.proc = m.launch(m.helper_log)
    assert procs.reap(m.proc, 60) == 78
    assert "but this endpoint was registered with high_assurance: false" in m.output(), m.output()[-2000:]
