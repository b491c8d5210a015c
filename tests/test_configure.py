"""`mepctl configure --multi-user NAME` as root: the files, their owners and modes, and
that what it writes is accepted by the broker's config loader and the helper's policy
loader as is."""

import json
import os
import stat
import subprocess

import pytest
import yaml

from broker import config as broker_config
from privhelper import policy as helper_policy
from tests.rigs import procs

pytestmark = pytest.mark.root
MEPCTL = ["/opt/mep/venv/bin/python3", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
          "from broker.mepctl import main; sys.exit(main())"]


def mepctl(rigdir, *args):
    return subprocess.run([*MEPCTL, str(rigdir.lib), *args], capture_output=True, text=True)


@pytest.fixture
def croot(rigdir):
    path = rigdir.path / f"conf-{os.urandom(3).hex()}"
    yield path
    procs.run("rm", "-rf", str(path))


def owner_mode(path):
    st = os.stat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_configure_writes_every_file_with_owner_and_mode(rigdir, accounts, croot):
    broker = accounts.broker
    out = mepctl(rigdir, "configure", "--multi-user", "hpc", "--config-root", str(croot), "--display-name", "HPC",
                 "--broker-user", broker.pw_name, "--uep-executable", str(rigdir.probe),
                 "--allowed-function", "00000000-0000-0000-0000-000000000001")
    assert out.returncode == 0, out.stderr
    d = croot / "hpc"
    assert "Created profile for endpoint named <hpc>" in out.stdout and "mepctl start hpc" in out.stdout
    assert owner_mode(d) == (0, 0, 0o755)
    for name in ("config.yaml", "example_identity_mapping_config.json", "user_config_template.yaml.j2",
                 "user_config_schema.json", "user_environment.yaml", "helper-policy.toml"):
        assert owner_mode(d / name) == (0, 0, 0o644), name
    assert owner_mode(d / "helper.key") == (0, broker.pw_gid, 0o640)
    assert len((d / "helper.key").read_bytes()) == 32
    assert owner_mode(d / "endpoint.log") == (broker.pw_uid, broker.pw_gid, 0o640)
    assert owner_mode(d / "run") == (broker.pw_uid, broker.pw_gid, 0o700)  # the admin socket's directory
    cfg = broker_config.load_config(d)  # the broker accepts it unchanged
    assert cfg.display_name == "HPC" and cfg.identity_mapping_config_path == d / "example_identity_mapping_config.json"
    assert cfg.allowed_functions == ("00000000-0000-0000-0000-000000000001",)
    pol = helper_policy.load_policy(str(d / "helper-policy.toml"))  # and so does the root helper
    assert pol.broker_user == broker.pw_name and pol.uep_argv == (str(rigdir.probe), "_start-user-endpoint", "{name}")
    assert pol.broker_argv[-4:] == ("--conf-dir", str(d), "--key", str(d / "helper.key"))
    json.loads((d / "user_config_schema.json").read_text())
    assert yaml.safe_load((d / "user_environment.yaml").read_text()) is None  # comments only


def test_configure_refuses_an_existing_endpoint_and_high_assurance_without_subscription(rigdir, accounts, croot):
    args = ["--config-root", str(croot), "--broker-user", accounts.broker.pw_name, "--uep-executable", str(rigdir.probe)]
    assert mepctl(rigdir, "configure", "--multi-user", "a", *args).returncode == 0
    again = mepctl(rigdir, "configure", "--multi-user", "a", *args)
    assert again.returncode == 1 and "config dir <a> already exists" in again.stderr
    ha = mepctl(rigdir, "configure", "--multi-user", "b", "--high-assurance", *args)
    assert ha.returncode == 1 and "--high-assurance needs --subscription-id" in ha.stderr
    assert not (croot / "b").exists()
    (croot / "a" / "registration.json").write_text("{}")
    toggle = mepctl(rigdir, "configure", "--multi-user", "a", "--high-assurance", "--subscription-id",
                    "00000000-0000-0000-0000-000000000002", *args)
    assert "high assurance cannot be toggled after registration" in toggle.stderr


def test_high_assurance_endpoint_gets_an_audit_log_and_loads(rigdir, accounts, croot):
    out = mepctl(rigdir, "configure", "--multi-user", "ha", "--config-root", str(croot), "--broker-user",
                 accounts.broker.pw_name, "--uep-executable", str(rigdir.probe), "--high-assurance",
                 "--subscription-id", "00000000-0000-0000-0000-000000000002")
    assert out.returncode == 0, out.stderr
    cfg = broker_config.load_config(croot / "ha")
    assert cfg.high_assurance and cfg.audit_log_path == croot / "ha" / "audit.log"
    assert owner_mode(croot / "ha" / "audit.log") == (accounts.broker.pw_uid, accounts.broker.pw_gid, 0o600)


def test_configure_refuses_a_root_the_broker_cannot_reach(rigdir, accounts, croot):
    croot.mkdir(mode=0o700)
    out = mepctl(rigdir, "configure", "--multi-user", "x", "--config-root", str(croot), "--broker-user",
                 accounts.broker.pw_name, "--uep-executable", str(rigdir.probe))
    assert out.returncode == 1 and "cannot reach" in out.stderr and "--config-root /etc/globus-compute" in out.stderr
