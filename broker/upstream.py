"""Read what upstream's globus-compute-endpoint (4.19 and older) left in an endpoint
directory, for `mepctl configure --multi-user NAME --from-upstream DIR`.

Why a converter and not "point the broker at DIR": upstream writes DIR as root with
umask 077 (config and identity mapping 0600), and its MEP runs as root, so nothing there
is readable by the broker account; our layout (broker/configure.py) needs root-owned
0644 copies next to a helper policy and key. What must survive is what users and
scripts see: the endpoint id (DIR/endpoint.json, upstream's file), the display name,
the identity mapping, the template, schema and user environment. Each file is checked
the way the broker or helper will use it, so a file that would refuse every start is
reported now, with its name, rather than at the first user's task.

Which file fills each role, first found wins: the flag naming it (upstream's
--template-config, --schema-config, --user-env-config, --id-mapping-config,
--core-config/--manager-config), then the path DIR/config.yaml names, then upstream's
default name in DIR (for the template also the older `user_config_template.yaml`), else
our seed file.
"""

from __future__ import annotations

import json
import os
import pathlib
import uuid

import attrs
import yaml

from broker import config as config_mod
from privhelper.policy import DEFAULT_ENV_DENY, FIXED_ENV

ROLES = ("config", "template", "schema", "user_env", "idmap")
# the config.yaml key that names each file, where there is one
PATH_KEYS = {"template": "user_config_template_path", "schema": "user_config_schema_path",
             "idmap": "identity_mapping_config_path"}
# the names upstream gives them in its endpoint directory
UPSTREAM_NAMES = {"config": ("config.yaml",), "template": ("user_config_template.yaml.j2", "user_config_template.yaml"),
                  "schema": ("user_config_schema.json",), "user_env": ("user_environment.yaml",),
                  "idmap": ("identity_mapping_config.json", "example_identity_mapping_config.json")}
# keys whose value is a file that the converted config must name in the new directory
_MOVED = ("identity_mapping_config_path", "user_config_template_path", "user_config_schema_path", "audit_log_path")


class UpstreamError(Exception):
    """The upstream directory or a named file cannot be converted; the message says which and why."""


@attrs.define
class Sources:
    """Where each file comes from, the converted config.yaml values, and what to tell the admin."""
    files: dict = attrs.Factory(dict)  # role -> path of the file to copy in
    config: dict | None = None  # converted config.yaml values (None: write our seed config)
    config_path: pathlib.Path | None = None
    endpoint_id: str | None = None
    kept: list = attrs.Factory(list)
    changed: list = attrs.Factory(list)
    pam_enable: bool | None = None  # upstream's pam.enable, for the helper policy


def endpoint_id(directory: pathlib.Path) -> str | None:
    path = directory / "endpoint.json"
    try:
        raw = json.loads(path.read_text())["endpoint_id"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UpstreamError(f"{path}: cannot read the endpoint id ({type(e).__name__}: {e}); upstream writes "
                            '{"endpoint_id": "<uuid>"} there') from None
    try:
        return str(uuid.UUID(str(raw)))
    except ValueError:
        raise UpstreamError(f"{path}: endpoint_id {raw!r} is not a UUID") from None


def gather(upstream_dir: pathlib.Path | None, flags: dict) -> Sources:
    """Decide every file's source and convert config.yaml; `flags` is role -> path given on the command line."""
    src = Sources()
    for role, path in flags.items():
        if path is not None:
            path = pathlib.Path(path).expanduser().resolve()
            if not path.is_file():
                raise UpstreamError(f"{path}: no such file (given for the {role.replace('_', ' ')})")
            src.files[role] = path
    if upstream_dir is not None:
        upstream_dir = upstream_dir.expanduser().resolve()
        if not (upstream_dir / "config.yaml").is_file():
            hint = " (a config.py endpoint: translate it to config.yaml first)" if (upstream_dir / "config.py").exists() else ""
            raise UpstreamError(f"{upstream_dir}: no config.yaml here, so this is not an upstream endpoint "
                                f"directory{hint}")
        src.endpoint_id = endpoint_id(upstream_dir)
        if src.endpoint_id:
            src.kept.append(f"endpoint id {src.endpoint_id} (from {upstream_dir / 'endpoint.json'})")
        else:
            src.changed.append(f"no {upstream_dir / 'endpoint.json'}: the endpoint was never registered, so it "
                               "gets a new id at its first start")
        src.files.setdefault("config", upstream_dir / "config.yaml")
    if "config" in src.files:
        _convert_config(src, src.files["config"])
    if upstream_dir is not None:
        for role, names in UPSTREAM_NAMES.items():
            for name in names:
                if role not in src.files and (upstream_dir / name).is_file():
                    src.files[role] = upstream_dir / name
                    if name == "user_config_template.yaml":
                        src.changed.append(f"template {upstream_dir / name} (upstream's older name) becomes "
                                           "user_config_template.yaml.j2")
        for role in ("template", "schema", "user_env", "idmap"):
            if role not in src.files:
                src.changed.append(f"no {UPSTREAM_NAMES[role][0]} in {upstream_dir}: writing the default one")
    return src


def _convert_config(src: Sources, path: pathlib.Path) -> None:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UpstreamError(f"{path}: cannot load it: {e}") from None
    if not isinstance(raw, dict):
        raise UpstreamError(f"{path}: the top level must be a mapping, not a {type(raw).__name__}")
    if "engine" in raw:
        raise UpstreamError(f"{path}: has an engine block, so it configures a single-user endpoint; a multi-user "
                            "endpoint's engine belongs in its user_config_template.yaml.j2")
    if raw.get("multi_user", True) is not True:
        raise UpstreamError(f"{path}: multi_user is {raw['multi_user']!r}: not a multi-user endpoint")
    values = {}
    for key, value in raw.items():
        try:
            config_mod._check(path, key, value)  # the broker's own check: what it refuses, we refuse now
        except config_mod.ConfigError as e:
            raise UpstreamError(str(e)) from None
        if key == "multi_user":
            src.changed.append(f"{path}: dropped `multi_user: true` (4.19's loader refuses the key; ours "
                               "needs none)")
            continue
        if key in _MOVED:
            if value:
                named = pathlib.Path(value).expanduser()
                values[key] = (path.parent / named).resolve()  # upstream resolves against the cwd; the dir is meant
            continue
        if key == "pam":
            src.pam_enable = (value or {}).get("enable", value is not None)  # upstream: a pam block means enabled
            src.kept.append(f"pam: enable {str(src.pam_enable).lower()} (now the root helper's policy decides it)")
        values[key] = value
    src.config, src.config_path = values, path
    kept = [k for k in values if k not in _MOVED and k != "pam"]
    if kept:
        src.kept.append(f"{path}: {', '.join(kept)}")
    for role, key in PATH_KEYS.items():
        if key in values and role not in src.files:
            if not values[key].is_file():
                raise UpstreamError(f"{path}: {key} names {values[key]}, which does not exist")
            src.files[role] = values[key]


def check_template(path: pathlib.Path) -> list:
    """Parse it as the broker's sandbox will; returns notes on what it includes (not copied).
    jinja2 is imported here, not at the top: `mepctl` runs as root and loads this module for
    every command, and only a configure that copies a template parses one (it never renders)."""
    import jinja2.meta
    from jinja2.sandbox import SandboxedEnvironment
    text = _read(path)
    try:
        ast = SandboxedEnvironment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise UpstreamError(f"{path}: line {e.lineno}: not a valid Jinja template: {e.message}") from None
    included = [name for name in jinja2.meta.find_referenced_templates(ast) if name]
    return [f"{path} includes {name}: copy it into the new directory yourself" for name in included]


def check_schema(path: pathlib.Path) -> None:
    import jsonschema  # here, not at the top: see check_template
    try:
        schema = json.loads(_read(path))
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except ValueError as e:
        raise UpstreamError(f"{path}: not valid JSON: {e}") from None
    except jsonschema.SchemaError as e:
        raise UpstreamError(f"{path}: not a valid JSON schema: {e.message}") from None


def convert_user_env(path: pathlib.Path) -> tuple[str, list]:
    """The file's text, less the names the helper refuses (each one noted): upstream sets
    them, but here every start naming one would be refused."""
    text = _read(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UpstreamError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or any(isinstance(v, (dict, list)) for v in data.values()):
        raise UpstreamError(f"{path}: must be flat `NAME: value` pairs")
    denied = [str(k) for k in data if str(k) in FIXED_ENV or any(
        str(k).startswith(p[:-1]) if p.endswith("*") else str(k) == p for p in DEFAULT_ENV_DENY)]
    if not denied:
        return text, []
    kept = {k: v for k, v in data.items() if str(k) not in denied}
    out = (f"# Converted from {path}: removed {', '.join(denied)} (the root helper refuses a start that sets them;\n"
           "# HOME, USER, LOGNAME and SHELL come from the user's passwd entry).\n")
    out += yaml.safe_dump(kept, sort_keys=False) if kept else ""
    return out, [f"{path}: removed {', '.join(denied)} (the root helper refuses a start that sets them)"]


def _read(path: pathlib.Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise UpstreamError(f"{path}: cannot read it ({e.strerror})") from None


def running_pid(upstream_dir: pathlib.Path) -> int | None:
    """Upstream's daemon.pid, if that process is alive: two MEPs on one id would split its commands."""
    try:
        pid = int((upstream_dir / "daemon.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None
