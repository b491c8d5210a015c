"""Migration from upstream: the files upstream 4.19's own `globus-compute-endpoint configure
--multi-user` writes (generated here, in a temporary HOME, never hand-written) load in the
broker, and `mepctl configure --multi-user NAME --from-upstream DIR` keeps the endpoint id
and converts the files; upstream's file flags work."""

import hashlib
import json
import os
import pathlib
import subprocess
import uuid

import pytest
import yaml

from broker import config as broker_config
from broker import registration
from privhelper import policy as helper_policy
from tests.rigs import procs
from tests.rigs.mep import idmap_expression
from tests.rigs.service import LocalService

UPSTREAM = "/opt/mep/uep-venv/bin/globus-compute-endpoint"
MEPCTL = ["/opt/mep/venv/bin/python3", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
          "from broker.mepctl import main; sys.exit(main())"]


def upstream_configure(home: pathlib.Path, name: str, *args) -> pathlib.Path:
    """Upstream 4.19's configure, as an admin runs it; returns its endpoint directory."""
    home.mkdir(parents=True, exist_ok=True)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    out = subprocess.run([UPSTREAM, "configure", "--multi-user", "true", "--contact-email", "admins@example.org",
                          *args, name], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return home / ".globus_compute" / name


def registered(directory: pathlib.Path) -> str:
    """What upstream's registration leaves: endpoint.json, written as 4.19's core_endpoint.py writes it."""
    endpoint_id = str(uuid.uuid4())
    (directory / "endpoint.json").write_text(json.dumps({"endpoint_id": endpoint_id}))
    return endpoint_id


def tree_digest(directory: pathlib.Path) -> dict:
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), os.stat(p).st_mode)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_broker_loads_what_upstream_configure_writes(tmp_path):
    d = upstream_configure(tmp_path / "home", "hpc", "--display-name", "HPC login")
    cfg = broker_config.load_config(d)  # 4.19 writes no multi_user key (its own loader refuses one)
    assert cfg.display_name == "HPC login" and cfg.email == "admins@example.org" and cfg.public is True
    assert cfg.identity_mapping_config_path == d / "example_identity_mapping_config.json"
    assert cfg.user_config_template_path == d / "user_config_template.yaml.j2"
    # the older template name is found, as upstream's load_user_config_template finds it
    (d / "user_config_template.yaml.j2").rename(d / "user_config_template.yaml")
    assert broker_config.load_config(d).user_config_template_path == d / "user_config_template.yaml"


def test_an_older_upstream_config_with_multi_user_converts(tmp_path):
    """The seed's older default config.yaml (amqp_port, display_name: null, multi_user: true)."""
    from broker import upstream
    (tmp_path / "idmap.json").write_text("[]")
    (tmp_path / "config.yaml").write_text(f"amqp_port: 443\ndisplay_name: null\nidentity_mapping_config_path: "
                                          f"{tmp_path / 'idmap.json'}\nmulti_user: true\n")
    src = upstream.gather(tmp_path, {})
    assert src.config == {"amqp_port": 443, "display_name": None,
                          "identity_mapping_config_path": tmp_path / "idmap.json"}
    assert src.files["idmap"] == tmp_path / "idmap.json" and "template" not in src.files
    assert any("dropped `multi_user: true`" in c for c in src.changed)
    assert any("no user_config_template.yaml.j2" in c for c in src.changed)  # the seed's is written instead


def mepctl(rigdir, *args):
    return subprocess.run([*MEPCTL, str(rigdir.lib), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def croot(rigdir):
    path = rigdir.path / f"conf-{os.urandom(3).hex()}"
    path.mkdir(mode=0o755)
    yield path
    procs.run("rm", "-rf", str(path))


def owner_mode(path):
    st = os.stat(path)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


@pytest.mark.root
def test_from_upstream_keeps_the_id_and_converts_the_files(rigdir, accounts, croot):
    up = upstream_configure(croot / "home", "hpc", "--display-name", "HPC login")
    endpoint_id = registered(up)
    cfg = yaml.safe_load((up / "config.yaml").read_text())
    cfg["pam"] = {"service_name": "gc-site"}  # upstream: a pam block without `enable` means enabled
    (up / "config.yaml").write_text(yaml.safe_dump(cfg))
    (up / "user_environment.yaml").write_text("SITE_SCRATCH: /scratch\nLD_PRELOAD: /tmp/x.so\nHOME: /elsewhere\n")
    template = (up / "user_config_template.yaml.j2").read_text()
    (up / "user_config_template.yaml.j2").rename(up / "user_config_template.yaml")  # the older name
    before = tree_digest(up)

    out = mepctl(rigdir, "configure", "--multi-user", "hpc", "--from-upstream", str(up), "--config-root", str(croot),
                 "--broker-user", accounts.broker.pw_name, "--uep-executable", str(rigdir.probe))
    assert out.returncode == 0, out.stderr
    kept, changed = out.stdout.split("  changed:")[0], out.stdout.split("  changed:")[1].split("left as it was")[0]
    assert f"endpoint id {endpoint_id}" in kept and "display_name, email, public" in kept
    assert "user_config_template.yaml (upstream's older name) becomes user_config_template.yaml.j2" in changed
    assert "removed LD_PRELOAD, HOME" in changed and "multi_user" not in changed
    d = croot / "hpc"
    assert json.loads((d / "endpoint.json").read_text()) == {"endpoint_id": endpoint_id}
    assert owner_mode(d / "endpoint.json") == (0, 0, 0o644)  # root's: the broker cannot change which endpoint it is
    for name in ("config.yaml", "example_identity_mapping_config.json", "user_config_template.yaml.j2",
                 "user_config_schema.json", "user_environment.yaml", "helper-policy.toml"):
        assert owner_mode(d / name) == (0, 0, 0o644), name  # upstream's are 0600: the broker could not read them
    assert (d / "user_config_template.yaml.j2").read_text() == template
    assert (d / "example_identity_mapping_config.json").read_bytes() == \
        (up / "example_identity_mapping_config.json").read_bytes()
    assert yaml.safe_load((d / "user_environment.yaml").read_text()) == {"SITE_SCRATCH": "/scratch"}

    loaded = broker_config.load_config(d)
    assert loaded.display_name == "HPC login" and loaded.email == "admins@example.org" and loaded.public
    assert loaded.identity_mapping_config_path == d / "example_identity_mapping_config.json"
    assert loaded.pam.enable and loaded.pam.service_name == "gc-site"
    pol = helper_policy.load_policy(str(d / "helper-policy.toml"))
    assert pol.pam.enabled and pol.pam.service == "gc-site"  # the helper decides PAM: upstream's choice reaches it
    assert registration.peek(loaded) == endpoint_id  # the broker registers under the kept id
    assert tree_digest(up) == before  # the upstream directory is left as it was


@pytest.mark.root
@pytest.mark.usefixtures("rabbitmq")
def test_a_migrated_endpoint_registers_with_its_old_id(rigdir, accounts, croot):
    up = upstream_configure(croot / "home", "hpc")
    endpoint_id = registered(up)
    assert mepctl(rigdir, "configure", "--multi-user", "hpc", "--from-upstream", str(up), "--config-root",
                  str(croot), "--broker-user", accounts.broker.pw_name,
                  "--uep-executable", str(rigdir.probe)).returncode == 0
    service = LocalService(rigdir)
    try:
        token = service.token_file("admin@example.org", accounts.broker.pw_gid)
        with open(croot / "hpc" / "config.yaml", "a") as f:
            f.write(f"compute_service_url: {service.url}\ncompute_service_token_file: {token}\n")

        class Log:
            def info(self, *a, **kw):
                pass
        reply = registration.obtain(broker_config.load_config(croot / "hpc"), Log())
        assert reply["endpoint_id"] == endpoint_id
        assert f"endpoint {endpoint_id} registered" in service.output()
    finally:
        service.stop()


@pytest.mark.root
def test_upstream_file_flags_copy_the_named_files(rigdir, accounts, croot):
    src = croot / "src"
    src.mkdir()
    (src / "core.yaml").write_text("display_name: from core\namqp_port: 443\nheartbeat_period: 15\n")
    (src / "tmpl.yaml.j2").write_text("engine:\n  type: ThreadPoolEngine\n  max_workers: {{ n | default(1) }}\n")
    (src / "schema.json").write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}}))
    (src / "env.yaml").write_text("SITE: yes-it-is\n")
    (src / "idmap.json").write_text(json.dumps(idmap_expression("site.example")))
    out = mepctl(rigdir, "configure", "--multi-user", "flags", "--config-root", str(croot), "--broker-user",
                 accounts.broker.pw_name, "--uep-executable", str(rigdir.probe),
                 "--manager-config", str(src / "core.yaml"), "--template-config", str(src / "tmpl.yaml.j2"),
                 "--schema-config", str(src / "schema.json"), "--user-env-config", str(src / "env.yaml"),
                 "--id-mapping-config", str(src / "idmap.json"))
    assert out.returncode == 0, out.stderr
    d = croot / "flags"
    for given, copy in (("tmpl.yaml.j2", "user_config_template.yaml.j2"), ("schema.json", "user_config_schema.json"),
                        ("env.yaml", "user_environment.yaml"), ("idmap.json", "identity_mapping_config.json")):
        assert (d / copy).read_bytes() == (src / given).read_bytes(), copy
    assert not (d / "example_identity_mapping_config.json").exists() and not (d / "endpoint.json").exists()
    cfg = broker_config.load_config(d)
    assert (cfg.display_name, cfg.amqp_port, cfg.heartbeat_period) == ("from core", 443, 15)
    assert cfg.identity_mapping_config_path == d / "identity_mapping_config.json"


@pytest.mark.root
@pytest.mark.parametrize("breakage, message", [
    ({"config.yaml": "engine:\n  type: ThreadPoolEngine\n"}, "has an engine block, so it configures a single-user"),
    ({"user_config_template.yaml.j2": "engine: {{ oops \n"}, "user_config_template.yaml.j2: line 1: not a valid Jinja"),
    ({"user_config_schema.json": '{"type": 7}'}, "user_config_schema.json: not a valid JSON schema"),
    ({"endpoint.json": '{"endpoint_id": "nope"}'}, "endpoint.json: endpoint_id 'nope' is not a UUID"),
    ({"example_identity_mapping_config.json": "[]"}, "must hold a non-empty JSON list"),
])
def test_a_file_that_would_refuse_every_start_refuses_the_conversion(rigdir, accounts, croot, breakage, message):
    up = upstream_configure(croot / "home", "bad")
    for name, text in breakage.items():
        (up / name).write_text(text)
    out = mepctl(rigdir, "configure", "--multi-user", "bad", "--from-upstream", str(up), "--config-root", str(croot),
                 "--broker-user", accounts.broker.pw_name, "--uep-executable", str(rigdir.probe))
    assert out.returncode == 1 and message in out.stderr, out.stderr
    assert not (croot / "bad").exists()  # nothing half-written


@pytest.mark.root
def test_converting_in_place_is_refused(rigdir, accounts, croot):
    up = upstream_configure(croot / "home", "same")
    out = mepctl(rigdir, "configure", "--multi-user", "same", "--from-upstream", str(up), "--config-root",
                 str(up.parent), "--broker-user", accounts.broker.pw_name, "--uep-executable", str(rigdir.probe))
    assert out.returncode == 1 and "is the upstream directory itself" in out.stderr, out.stderr


@pytest.mark.root
def test_a_high_assurance_endpoint_keeps_its_policy_and_gets_an_audit_log_the_broker_writes(rigdir, accounts, croot):
    policy, subscription = str(uuid.UUID(int=10)), str(uuid.UUID(int=11))
    up = upstream_configure(croot / "home", "ha", "--high-assurance", "--auth-policy", policy,
                            "--subscription-id", subscription)
    (up / "audit.log").write_text("upstream's records\n")
    out = mepctl(rigdir, "configure", "--multi-user", "ha", "--from-upstream", str(up), "--config-root", str(croot),
                 "--broker-user", accounts.broker.pw_name, "--uep-executable", str(rigdir.probe))
    assert out.returncode == 0, out.stderr
    d = croot / "ha"
    cfg = broker_config.load_config(d)
    assert cfg.high_assurance and cfg.subscription_id == subscription and cfg.authentication_policy == policy
    assert cfg.audit_log_path == d / "audit.log"
    assert owner_mode(d / "audit.log") == (accounts.broker.pw_uid, accounts.broker.pw_gid, 0o600)
    assert f"audit_log_path: {up / 'audit.log'} -> {d / 'audit.log'}" in out.stdout
    assert (up / "audit.log").read_text() == "upstream's records\n"  # the old log stays where it is
