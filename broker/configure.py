"""`mepctl configure --multi-user NAME`: write a new MEP's directory, as root.

Who owns what, and why:
  NAME/                       root:root 0755   the broker reads it, never writes it
  config.yaml, template, schema, user_environment.yaml, identity mapping
                              root:root 0644   admin-owned; the broker only reads them
  helper-policy.toml          root:root 0644   the only input the root helper trusts
  helper.key                  root:BROKER 0640 32 random bytes; the broker proves it holds them
  endpoint.log                BROKER:BROKER 0640  the one file the broker writes here
  run/                        BROKER:BROKER 0700  the broker's admin socket (root and the broker only)
  endpoint.json               root:root 0644   with --from-upstream: the id kept from upstream's directory

Any of the admin's files may come from elsewhere instead of the seed: upstream's flags
(--core-config/--manager-config, --template-config, --schema-config, --user-env-config,
--id-mapping-config) or a whole upstream directory (--from-upstream); broker/upstream.py
decides which file fills each role and checks it. They are copied, never referenced,
because the broker must be able to read them and upstream writes them root-only.
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

import yaml

from broker import layout, seed, upstream
from privhelper import policy as policy_mod

DEFAULT_BROKER = "gcmep"
DEFAULT_UEP = "/opt/mep/uep-venv/bin/mep-uep-start"  # scripts/uep-start.sh: makes the UEP dir, then execs it
from broker.layout import (IDMAP_CUSTOM, IDMAP_FILE, KEY_FILE, POLICY_FILE, SCHEMA_FILE,  # noqa: E402,F401
                           TEMPLATE_FILE, USER_ENV_FILE)


class ConfigureError(Exception):
    pass


SYSTEM_ROOT = pathlib.Path("/etc/globus-compute")


def default_root() -> pathlib.Path:
    """$GLOBUS_COMPUTE_USER_DIR, else /etc/globus-compute. Not root's ~/.globus_compute, as
    upstream's all-root MEP uses: root's home is 0700, and the broker must read the
    directory (docs/decisions.md)."""
    return pathlib.Path(os.environ.get("GLOBUS_COMPUTE_USER_DIR") or SYSTEM_ROOT)


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
              audit_log_path=None, allowed_functions=(), uep_executable=DEFAULT_UEP, contact_email=None,
              files=None, from_upstream=None, new_policy=None, say=print) -> pathlib.Path:
    """`files`: role (broker/upstream.ROLES) -> a file to copy instead of the seed's;
    `from_upstream`: an upstream endpoint directory to convert, keeping its id;
    `new_policy`: a broker/auth_policy.PolicyRequest: create that Globus Auth policy (after
    every local check, before anything is written) and apply it."""
    if os.geteuid() != 0:
        raise ConfigureError("must run as root: the helper policy and key must be root-owned")
    if problem := endpoint_name_problem(name):
        raise ConfigureError(f"Invalid endpoint name {name!r}: {problem}")
    conf_dir = root.expanduser().resolve() / name
    if from_upstream and pathlib.Path(from_upstream).expanduser().resolve() == conf_dir:
        raise ConfigureError(f"{conf_dir} is the upstream directory itself; convert it into another config root "
                             "(e.g. `--config-root /etc/globus-compute`): upstream's files are root-only, and the "
                             "original stays as it is for going back")
    if conf_dir.exists():
        reg = conf_dir / "registration.json"
        if reg.exists() and high_assurance != ("high_assurance: true" in layout.config_file(conf_dir).read_text()):
            raise ConfigureError(f"{conf_dir} is registered; high assurance cannot be toggled after registration. "
                                 "Configure a new endpoint instead.")
        raise ConfigureError(f"config dir <{name}> already exists: {conf_dir}")
    try:
        src = upstream.gather(pathlib.Path(from_upstream) if from_upstream else None, files or {})
    except upstream.UpstreamError as e:
        raise ConfigureError(str(e)) from None
    base = src.config or {}
    high_assurance = high_assurance or base.get("high_assurance") is True
    subscription_id = subscription_id or base.get("subscription_id")
    if high_assurance and not subscription_id:
        raise ConfigureError("--high-assurance needs --subscription-id")
    if src.pam_enable is not None:
        pam = pam or src.pam_enable
        pam_service = (base.get("pam") or {}).get("service_name", pam_service)
    broker = ensure_broker_account(broker_user, say)
    if broker.pw_uid == 0:
        raise ConfigureError("the broker account must not be root")
    conf_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    check_reachable(conf_dir, broker)
    try:  # the helper's own rule for every directory above its policy: what `start` will check
        policy_mod.check_trusted_path(str(conf_dir.parent), "the config root", want_file=False)
    except policy_mod.PolicyError as e:
        raise ConfigureError(f"{e}; the root helper would refuse to start from there. Choose a config root that only "
                             f"root can write, e.g. `--config-root {SYSTEM_ROOT}`") from None
    if new_policy is not None:  # last: a policy is made only for a directory that will be written
        from broker import auth_policy as policy_maker
        try:
            auth_policy = policy_maker.create(new_policy, say=say)
        except policy_maker.PolicyError as e:
            raise ConfigureError(str(e)) from None
    conf_dir.mkdir(mode=0o755)
    os.chmod(conf_dir, 0o755)
    try:
        notes = _copy_in(conf_dir, src)
        _write_all(conf_dir, name, broker, display_name, pam, pam_service, high_assurance, subscription_id,
                   auth_policy, audit_log_path, allowed_functions, uep_executable, src, contact_email)
    except upstream.UpstreamError as e:
        subprocess.run(["rm", "-rf", "--one-file-system", str(conf_dir)], check=False)
        raise ConfigureError(str(e)) from None
    except BaseException:
        subprocess.run(["rm", "-rf", "--one-file-system", str(conf_dir)], check=False)
        raise
    if from_upstream or files:
        _report(say, src, notes, conf_dir, from_upstream)
    say(f"Created profile for endpoint named <{name}>\n"
        f"\n\tConfiguration file: {conf_dir / 'config.yaml'}"
        f"\n\n\tIdentity mapping configuration: {conf_dir / _idmap_name(src)}"
        f"\n\n\tUser endpoint configuration template: {conf_dir / 'user_config_template.yaml.j2'}"
        f"\n\tUser endpoint configuration schema: {conf_dir / 'user_config_schema.json'}"
        f"\n\tUser endpoint environment variables: {conf_dir / 'user_environment.yaml'}"
        f"\n\n\tHelper policy (root only): {conf_dir / POLICY_FILE}"
        f"\n\tHelper key (root, readable by {broker.pw_name}): {conf_dir / KEY_FILE}"
        f"\n\tBroker account: {broker.pw_name} (uid {broker.pw_uid})"
        f"\n\nEdit the identity mapping before you start it, then run:\n"
        f"\n\t$ mepctl start {name}" + ("" if root == default_root() else f" --config-root {root}"))
    if from_upstream and (pid := upstream.running_pid(pathlib.Path(from_upstream))):
        say(f"\nWarning: upstream's endpoint in {from_upstream} is running (pid {pid}); stop it before starting this "
            "one: two endpoints with one id would split its users' commands.")
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


def _idmap_name(src) -> str:
    given = src.files.get("idmap")
    if given is None:
        return IDMAP_FILE
    return given.name if given.name in (IDMAP_FILE, IDMAP_CUSTOM) else IDMAP_CUSTOM


def _copy_in(conf_dir, src) -> list:
    """Check and copy each given file; returns notes for the admin."""
    notes = []
    for role, dest in (("template", TEMPLATE_FILE), ("schema", SCHEMA_FILE), ("user_env", USER_ENV_FILE),
                       ("idmap", _idmap_name(src))):
        path = src.files.get(role)
        if path is None:
            continue
        text = path.read_bytes()
        if role == "template":
            notes += upstream.check_template(path)
        elif role == "schema":
            upstream.check_schema(path)
        elif role == "user_env":
            text, more = upstream.convert_user_env(path)
            notes += more
        elif role == "idmap":
            _check_idmap(path)
        _write(conf_dir / dest, text)
        src.kept.append(f"{path} -> {conf_dir / dest}")
    return notes


def _check_idmap(path) -> None:
    from broker import idmap  # globus-identity-mapping: only when there is a file to check
    try:
        idmap.load(path, "00000000-0000-0000-0000-000000000000")
    except idmap.MappingConfigError as e:
        raise upstream.UpstreamError(str(e)) from None


def _report(say, src, notes, conf_dir, from_upstream) -> None:
    lines = [f"Converted {from_upstream}:" if from_upstream else "Copied the files given:", "  kept:"]
    lines += [f"    {k}" for k in src.kept] or ["    (nothing)"]
    changed = src.changed + notes
    lines += ["  changed:"] + ([f"    {c}" for c in changed] or ["    (nothing)"])
    if from_upstream:
        lines.append(f"  left as it was: {from_upstream} (nothing there is modified)")
    say("\n".join(lines) + "\n")


def _converted_config(conf_dir, src, display_name, idmap_path, high_assurance, subscription_id, auth_policy,
                      audit_log_path, allowed_functions, pam, pam_service, contact_email) -> str:
    """config.yaml from a given (upstream) config.yaml: its keys, the copied files' paths, the flags' values."""
    cfg = dict(src.config)
    for key, value in (("display_name", display_name), ("email", contact_email),
                       ("authentication_policy", auth_policy), ("subscription_id", subscription_id)):
        if value:
            cfg[key] = value
    cfg["identity_mapping_config_path"] = str(idmap_path)
    for key, dest in (("user_config_template_path", TEMPLATE_FILE), ("user_config_schema_path", SCHEMA_FILE)):
        if key in cfg:
            cfg[key] = dest
    if high_assurance:
        cfg["high_assurance"] = True
        new_audit = str(audit_log_path or layout.default_audit_file(conf_dir))
        if src.config.get("audit_log_path") and str(src.config["audit_log_path"]) != new_audit:
            src.changed.append(f"audit_log_path: {src.config['audit_log_path']} -> {new_audit} (the broker "
                               "account writes it; the old log stays where it is)")
        cfg["audit_log_path"] = new_audit
    elif "audit_log_path" in cfg:
        del cfg["audit_log_path"]
    if allowed_functions:
        cfg["allowed_functions"] = list(allowed_functions)
    if "pam" in cfg or pam:
        cfg["pam"] = {"enable": pam, "service_name": pam_service}
    if src.config_path and (old := src.config.get("identity_mapping_config_path")) and str(old) != str(idmap_path):
        src.changed.append(f"identity_mapping_config_path: {old} -> {idmap_path}")
    header = (f"# Converted by `mepctl configure` from {src.config_path}.\n"
              "# Upstream's keys (docs/); the settings of each user's endpoint live in user_config_template.yaml.j2.\n"
              f"# PAM is decided by the root helper's policy ({conf_dir / POLICY_FILE}); `pam` here mirrors it.\n")
    return header + yaml.safe_dump(cfg, sort_keys=False)


def _write_all(conf_dir, name, broker, display_name, pam, pam_service, high_assurance, subscription_id, auth_policy,
               audit_log_path, allowed_functions, uep_executable, src, contact_email) -> None:
    ha = ""
    if high_assurance:
        ha = seed.HIGH_ASSURANCE.format(subscription_id=subscription_id,
                                        auth_policy=f"authentication_policy: {auth_policy}\n" if auth_policy else "",
                                        audit_log_path=audit_log_path or layout.default_audit_file(conf_dir))
    else:  # the seed: any MEP may belong to a subscription and name an authentication policy
        ha = "".join(f"{key}: {value}\n" for key, value in (("subscription_id", subscription_id),
                                                              ("authentication_policy", auth_policy)) if value)
    af = ""
    if allowed_functions:
        af = "\n# Only these functions may run on this endpoint's user endpoints.\nallowed_functions:\n" + \
             "".join(f"  - {f}\n" for f in allowed_functions)
    idmap_path = conf_dir / _idmap_name(src)
    if src.config is None:
        if contact_email:
            ha += f"email: {json.dumps(contact_email)}\n"
        text = seed.CONFIG.format(
            display_name=json.dumps(display_name), idmap_path=idmap_path, high_assurance=ha,
            allowed_functions=af, policy_path=conf_dir / POLICY_FILE, pam_enable=str(pam).lower(),
            pam_service=pam_service)
    else:
        text = _converted_config(conf_dir, src, display_name, idmap_path, high_assurance, subscription_id,
                                 auth_policy, audit_log_path, allowed_functions, pam, pam_service, contact_email)
    _write(layout.config_file(conf_dir), text)
    for role, dest, default in (("idmap", idmap_path.name, seed.IDMAP_EXAMPLE),
                                ("template", TEMPLATE_FILE, seed.USER_CONFIG_TEMPLATE),
                                ("schema", SCHEMA_FILE, seed.USER_CONFIG_SCHEMA),
                                ("user_env", USER_ENV_FILE, seed.USER_ENVIRONMENT)):
        if role not in src.files:
            _write(conf_dir / dest, default)
    if src.endpoint_id:
        _write(layout.upstream_endpoint_file(conf_dir), json.dumps({"endpoint_id": src.endpoint_id}) + "\n")
    _write(conf_dir / KEY_FILE, secrets.token_bytes(32), 0o640, (0, broker.pw_gid))
    broker_argv = [sys.executable, "-I", "-m", "broker.main", "--conf-dir", str(conf_dir), "--key",
                   str(conf_dir / KEY_FILE)]
    _write(conf_dir / POLICY_FILE, seed.POLICY.format(
        broker_user=broker.pw_name, key_file=conf_dir / KEY_FILE, broker_argv=json.dumps(broker_argv),
        uep_argv=json.dumps([uep_executable, "_start-user-endpoint", "{name}"]), pam_enable=str(pam).lower(),
        pam_service=pam_service))
    _write(layout.log_file(conf_dir), "", 0o640, (broker.pw_uid, broker.pw_gid))
    layout.run_dir(conf_dir).mkdir(mode=0o700)
    os.chown(layout.run_dir(conf_dir), broker.pw_uid, broker.pw_gid)
    if high_assurance:
        audit = pathlib.Path(audit_log_path or layout.default_audit_file(conf_dir))
        if not audit.exists():
            _write(audit, "", 0o600, (broker.pw_uid, broker.pw_gid))
