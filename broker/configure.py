"""`mepctl configure --multi-user NAME`: write a new MEP's directory, as root.

Who owns what, and why:
  NAME/                       root:root 0755   the broker reads it, never writes it
  config.yaml, template, schema, user_environment.yaml, identity mapping
                              root:root 0644   admin-owned; the broker only reads them
  helper-policy.toml          root:root 0644   the only input the root helper trusts
  helper.key                  root:BROKER 0640 32 random bytes; the broker proves it holds them
  endpoint.log                BROKER:BROKER 0640  the one file the broker writes here
  run/                        BROKER:BROKER 0700  the broker's admin socket (root and the broker only)
"""

from __future__ import annotations

import json
import os
import pathlib
import pwd
import re
import secrets
import stat
import subprocess
import sys
import uuid

from broker import seed

DEFAULT_BROKER = "gcmep"
DEFAULT_UEP = "/opt/mep/uep-venv/bin/mep-uep-start"  # scripts/uep-start.sh: makes the UEP dir, then execs it
IDMAP_FILE = "example_identity_mapping_config.json"
POLICY_FILE = "helper-policy.toml"
KEY_FILE = "helper.key"


class ConfigureError(Exception):
    pass


def default_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GLOBUS_COMPUTE_USER_DIR") or pathlib.Path.home() / ".globus_compute")


def ensure_broker_account(name: str, say) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    say(f"created the system account {name!r} for the broker (no login shell, no home)")
    return pwd.getpwnam(name)


def check_reachable(path: pathlib.Path, broker: pwd.struct_passwd) -> None:
    """The broker must traverse every directory above the MEP's directory."""
    for parent in reversed(path.parents):
        st = parent.stat()
        if st.st_mode & stat.S_IXOTH or (st.st_gid == broker.pw_gid and st.st_mode & stat.S_IXGRP):
            continue
        raise ConfigureError(f"the broker account {broker.pw_name} cannot reach {path}: {parent} is mode "
                             f"{stat.filemode(st.st_mode)}. Choose a config root it can traverse, e.g. "
                             "`--config-root /etc/globus-compute`")


def endpoint_name_problem(name: str) -> str | None:
    """Upstream's rule (Endpoint.validate_endpoint_name: the name goes into Parsl's shell
    commands), and not a UUID, which `start` would take for an endpoint id."""
    if not name:
        return "received no endpoint name"
    if len(name) > 128:
        return f"must be less than 129 characters (length: {len(name)})"
    if re.search(r"[\\/\s'\"]", name) or name.startswith(".") or name == "..":
        return "no whitespace (spaces, newlines, tabs), slashes, quotes or backslashes, nor a leading '.'"
    try:
        uuid.UUID(name)
    except ValueError:
        return None
    return "it looks like an endpoint id (a UUID); choose a name"


def configure(name: str, root: pathlib.Path, *, display_name=None, broker_user=DEFAULT_BROKER, pam=False,
              pam_service="globus-compute-endpoint", high_assurance=False, subscription_id=None, auth_policy=None,
              audit_log_path=None, allowed_functions=(), uep_executable=DEFAULT_UEP, say=print) -> pathlib.Path:
    if os.geteuid() != 0:
        raise ConfigureError("must run as root: the helper policy and key must be root-owned")
    if problem := endpoint_name_problem(name):
        raise ConfigureError(f"Invalid endpoint name {name!r}: {problem}")
    conf_dir = root.expanduser().resolve() / name
    if conf_dir.exists():
        reg = conf_dir / "registration.json"
        if reg.exists() and high_assurance != ("high_assurance: true" in (conf_dir / "config.yaml").read_text()):
            raise ConfigureError(f"{conf_dir} is registered; high assurance cannot be toggled after registration. "
                                 "Configure a new endpoint instead.")
        raise ConfigureError(f"config dir <{name}> already exists: {conf_dir}")
    if high_assurance and not subscription_id:
        raise ConfigureError("--high-assurance needs --subscription-id")
    broker = ensure_broker_account(broker_user, say)
    if broker.pw_uid == 0:
        raise ConfigureError("the broker account must not be root")
    conf_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    check_reachable(conf_dir, broker)
    conf_dir.mkdir(mode=0o755)
    os.chmod(conf_dir, 0o755)
    try:
        _write_all(conf_dir, name, broker, display_name, pam, pam_service, high_assurance, subscription_id,
                   auth_policy, audit_log_path, allowed_functions, uep_executable)
    except BaseException:
        subprocess.run(["rm", "-rf", "--one-file-system", str(conf_dir)], check=False)
        raise
    say(f"Created profile for endpoint named <{name}>\n"
        f"\n\tConfiguration file: {conf_dir / 'config.yaml'}"
        f"\n\n\tIdentity mapping configuration: {conf_dir / IDMAP_FILE}"
        f"\n\n\tUser endpoint configuration template: {conf_dir / 'user_config_template.yaml.j2'}"
        f"\n\tUser endpoint configuration schema: {conf_dir / 'user_config_schema.json'}"
        f"\n\tUser endpoint environment variables: {conf_dir / 'user_environment.yaml'}"
        f"\n\n\tHelper policy (root only): {conf_dir / POLICY_FILE}"
        f"\n\tHelper key (root, readable by {broker.pw_name}): {conf_dir / KEY_FILE}"
        f"\n\tBroker account: {broker.pw_name} (uid {broker.pw_uid})"
        f"\n\nEdit the identity mapping before you start it, then run:\n"
        f"\n\t$ mepctl start {name}" + ("" if root == default_root() else f" --config-root {root}"))
    if not os.access(uep_executable, os.X_OK):
        say(f"\nNote: the UEP program {uep_executable} does not exist yet; install globus-compute-endpoint there "
            f"or edit uep_argv in {conf_dir / POLICY_FILE}.")
    return conf_dir


def _write(path: pathlib.Path, text: str | bytes, mode=0o644, owner=(0, 0)) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    os.chown(path, *owner)
    os.chmod(path, mode)


def _write_all(conf_dir, name, broker, display_name, pam, pam_service, high_assurance, subscription_id, auth_policy,
               audit_log_path, allowed_functions, uep_executable) -> None:
    ha = ""
    if high_assurance:
        ha = seed.HIGH_ASSURANCE.format(subscription_id=subscription_id,
                                        auth_policy=f"authentication_policy: {auth_policy}\n" if auth_policy else "",
                                        audit_log_path=audit_log_path or conf_dir / "audit.log")
    af = ""
    if allowed_functions:
        af = "\n# Only these functions may run on this endpoint's user endpoints.\nallowed_functions:\n" + \
             "".join(f"  - {f}\n" for f in allowed_functions)
    _write(conf_dir / "config.yaml", seed.CONFIG.format(
        display_name=json.dumps(display_name or name), idmap_path=conf_dir / IDMAP_FILE, high_assurance=ha,
        allowed_functions=af, policy_path=conf_dir / POLICY_FILE, pam_enable=str(pam).lower(),
        pam_service=pam_service))
    _write(conf_dir / IDMAP_FILE, seed.IDMAP_EXAMPLE)
    _write(conf_dir / "user_config_template.yaml.j2", seed.USER_CONFIG_TEMPLATE)
    _write(conf_dir / "user_config_schema.json", seed.USER_CONFIG_SCHEMA)
    _write(conf_dir / "user_environment.yaml", seed.USER_ENVIRONMENT)
    _write(conf_dir / KEY_FILE, secrets.token_bytes(32), 0o640, (0, broker.pw_gid))
    broker_argv = [sys.executable, "-I", "-m", "broker.main", "--conf-dir", str(conf_dir), "--key",
                   str(conf_dir / KEY_FILE)]
    _write(conf_dir / POLICY_FILE, seed.POLICY.format(
        broker_user=broker.pw_name, key_file=conf_dir / KEY_FILE, broker_argv=json.dumps(broker_argv),
        uep_argv=json.dumps([uep_executable, "_start-user-endpoint", "{name}"]), pam_enable=str(pam).lower(),
        pam_service=pam_service))
    _write(conf_dir / "endpoint.log", "", 0o640, (broker.pw_uid, broker.pw_gid))
    (conf_dir / "run").mkdir(mode=0o700)
    os.chown(conf_dir / "run", broker.pw_uid, broker.pw_gid)
    if high_assurance:
        audit = pathlib.Path(audit_log_path or conf_dir / "audit.log")
        if not audit.exists():
            _write(audit, "", 0o600, (broker.pw_uid, broker.pw_gid))
