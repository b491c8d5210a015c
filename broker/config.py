"""A MEP's config.yaml, loaded into attrs classes.

The keys are upstream's (globus-compute-endpoint 4.19, CoreEndpointConfig) plus two of
our own for registration (compute_service_url, compute_service_token_file,
client_credentials_file, auth_service_url), so an
existing multi-user config.yaml loads unchanged: 4.19 writes no `multi_user` key (its
loader refuses one), older files say `multi_user: true`; both load. As upstream, a
template path ending in .j2 that does not exist falls back to the name without .j2 (the
older `user_config_template.yaml`). Every error names the file, the key and what to
write instead: an administrator fixes it in one go.
"""

from __future__ import annotations

import difflib
import pathlib
import uuid

import attrs
import yaml

from broker import layout
from broker.layout import CONFIG_FILE

DEFAULT_TEMPLATE = layout.TEMPLATE_FILE
DEFAULT_SCHEMA = layout.SCHEMA_FILE
USER_ENVIRONMENT = layout.USER_ENV_FILE
# keys of a *user* endpoint's config that people put in the MEP's file by mistake
_UEP_KEYS = {"engine", "executors", "idle_heartbeats_soft", "idle_heartbeats_hard", "endpoint_setup",
             "endpoint_teardown", "worker_init", "provider"}


class ConfigError(Exception):
    """config.yaml cannot be used; the message says where and how to fix it."""


@attrs.frozen
class PamConfig:
    enable: bool = False
    service_name: str = "globus-compute-endpoint"


@attrs.frozen
class MEPConfig:
    conf_dir: pathlib.Path
    identity_mapping_config_path: pathlib.Path
    user_config_template_path: pathlib.Path
    user_config_schema_path: pathlib.Path
    multi_user: bool = True
    display_name: str | None = None
    high_assurance: bool = False
    subscription_id: str | None = None
    authentication_policy: str | None = None
    audit_log_path: pathlib.Path | None = None
    allowed_functions: tuple[str, ...] | None = None
    admins: tuple[str, ...] = ()
    pam: PamConfig = PamConfig()
    debug: bool = False
    public: bool = False
    heartbeat_period: float = 30
    amqp_port: int | None = None
    mu_child_ep_grace_period_s: float = 30.0
    email: str | None = None
    environment: str | None = None
    local_compute_services: bool = False
    compute_service_url: str | None = None  # ours: the service to register with (else upstream's choice)
    compute_service_token_file: pathlib.Path | None = None  # ours: a bearer token for that service
    client_credentials_file: pathlib.Path | None = None  # ours: GLOBUS_COMPUTE_CLIENT_ID/SECRET lines (root:broker 0640)
    auth_service_url: str | None = None  # ours: GLOBUS_SDK_SERVICE_URL_AUTH for the broker (a non-production Auth)

    @property
    def name(self) -> str:
        return self.conf_dir.name

    @property
    def user_environment_path(self) -> pathlib.Path:
        return self.conf_dir / USER_ENVIRONMENT


def _uuid(value) -> str:
    return str(uuid.UUID(str(value)))


# key -> (check/convert, what to write)
_FIELDS = {
    "multi_user": (bool, "true"),
    "display_name": (str, "a quoted string, e.g. \"HPC login node\""),
    "identity_mapping_config_path": (str, "the path of the identity mapping JSON file"),
    "user_config_template_path": (str, "the path of the Jinja template for user endpoints"),
    "user_config_schema_path": (str, "the path of the JSON schema for user options"),
    "high_assurance": (bool, "true or false"),
    "subscription_id": (_uuid, "a Globus subscription id (a UUID)"),
    "authentication_policy": (_uuid, "a Globus authentication policy id (a UUID)"),
    "audit_log_path": (str, "an absolute path for the audit log"),
    "allowed_functions": ("uuids", "a list of function ids (UUIDs)"),
    "admins": ("uuids", "a list of Globus identity ids (UUIDs)"),
    "pam": (dict, "a mapping: {enable: true, service_name: globus-compute-endpoint}"),
    "debug": (bool, "true or false"),
    "public": (bool, "true or false"),
    "heartbeat_period": ("number", "a number of seconds, e.g. 30"),
    "amqp_port": (int, "a port number: 443 or 5671 (or 5672 for a local RabbitMQ)"),
    "mu_child_ep_grace_period_s": ("number", "a number of seconds, e.g. 30"),
    "email": (str, "a contact e-mail address"),
    "environment": (str, "a Globus environment name; leave it out for production"),
    "local_compute_services": (bool, "true or false"),
    "compute_service_url": (str, "the web service's base URL, e.g. http://127.0.0.1:5000"),
    "compute_service_token_file": (str, "the path of a file holding the bearer token the MEP registers with"),
    "client_credentials_file": (str, "the path of a root:broker 0640 file with GLOBUS_COMPUTE_CLIENT_ID=... and "
                                "GLOBUS_COMPUTE_CLIENT_SECRET=... lines"),
    "auth_service_url": (str, "the base URL of a non-production Globus Auth, e.g. http://localhost:5000"),
}


def load_config(conf_dir: pathlib.Path | str) -> MEPConfig:
    conf_dir = pathlib.Path(conf_dir)
    path = layout.config_file(conf_dir)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror}); run `mepctl configure --multi-user {conf_dir.name}` "
                          "to create it") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, not a {type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        values[key] = _check(path, key, value)
    if values.get("multi_user", True) is not True:
        raise ConfigError(f"{path}: multi_user must be true or absent: this endpoint starts user endpoints as the "
                          "mapped local users (delete the line)")
    if not values.get("identity_mapping_config_path"):
        raise ConfigError(f"{path}: identity_mapping_config_path is required: a multi-user endpoint changes users, "
                          "so it must know how to map Globus identities to local accounts (write "
                          f"`identity_mapping_config_path: {conf_dir / 'identity_mapping.json'}`)")
    if values.get("high_assurance") and not values.get("subscription_id"):
        raise ConfigError(f"{path}: high_assurance needs subscription_id (a high-assurance endpoint must belong to a "
                          "subscription)")
    for key, default in (("user_config_template_path", DEFAULT_TEMPLATE), ("user_config_schema_path", DEFAULT_SCHEMA)):
        values.setdefault(key, default)
    for key in ("identity_mapping_config_path", "user_config_template_path", "user_config_schema_path", "audit_log_path",
                "compute_service_token_file", "client_credentials_file"):
        if values.get(key) is not None:
            values[key] = layout.resolve(conf_dir, values[key])  # relative paths: to the config dir
    template = values["user_config_template_path"]
    if template.suffix == ".j2" and not template.exists() and template.with_suffix("").exists():
        values["user_config_template_path"] = template.with_suffix("")  # upstream's older name
    for key in ("user_config_template_path", "user_config_schema_path"):  # named, they must exist, as upstream says
        if raw.get(key) and not values[key].exists():
            raise ConfigError(f"{path}: {key} names {values[key]}, which does not exist (a schema that is named but "
                              "missing would turn validation off unseen); create it, or remove the key")
    return MEPConfig(conf_dir=conf_dir, **values)


def _check(path: pathlib.Path, key, value):
    if key not in _FIELDS:
        if key in _UEP_KEYS:
            raise ConfigError(f"{path}: {key!r} configures a user endpoint, not the multi-user endpoint; move it to "
                              f"{DEFAULT_TEMPLATE}")
        close = difflib.get_close_matches(str(key), _FIELDS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(_FIELDS))}"
        raise ConfigError(f"{path}: unknown key {key!r} ({hint})")
    kind, want = _FIELDS[key]
    if value is None and key != "pam":
        return None
    if key == "pam":
        return _pam(path, value)
    bad = ConfigError(f"{path}: {key} is {value!r} ({type(value).__name__}); write {want}")
    if kind == "number":
        if type(value) not in (int, float) or value <= 0:
            raise bad
        return value
    if kind == "uuids":
        if not isinstance(value, list):
            raise bad
        try:
            return tuple(_uuid(v) for v in value)
        except ValueError:
            raise bad from None
    if kind is _uuid:
        try:
            return _uuid(value)
        except ValueError:
            raise bad from None
    if type(value) is not kind:  # bool is not int here, and "yes" is not a bool
        raise bad
    return value


def _pam(path: pathlib.Path, value) -> PamConfig:
    if value is None:
        return PamConfig()
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: pam must be a mapping, e.g. `pam: {{enable: true, service_name: "
                          "globus-compute-endpoint}}`")
    for key, v in value.items():
        want = {"enable": bool, "service_name": str}.get(key)
        if want is None:
            raise ConfigError(f"{path}: pam: unknown key {key!r} (known: enable, service_name)")
        if type(v) is not want:
            raise ConfigError(f"{path}: pam.{key} is {v!r}; write {'true or false' if want is bool else 'a PAM service name'}")
    return PamConfig(**{"enable": True, **value})  # as upstream's PamConfiguration: a pam block means enabled
