"""An endpoint directory's layout: every file name the broker, mepctl and the units use.

One place, so that the copies cannot drift (they did: boot.py read `audit_log_path` from
config.yaml as written, where config.py resolves it against the directory). Standard
library only: `mepctl` runs as root and imports this (tests/test_import_closure.py).

    NAME/                           root:root, the broker reads it (broker/configure.py: owners and modes)
      config.yaml                   the MEP's configuration (broker/config.py)
      user_config_template.yaml.j2  user_config_schema.json  user_environment.yaml
      example_identity_mapping_config.json (or identity_mapping_config.json)
      helper-policy.toml  helper.key     the root helper's policy and the broker's proof key
      endpoint.json                 upstream's id file (kept by --from-upstream), root-owned
      registration.json             a static registration (tests, a local service)
      endpoint.log                  the broker's log: the one file it writes here
      audit.log                     high assurance: the default audit log
      run/                          the broker's own directory (mode 0700)
        admin.sock  mep.lock  inflight.json  endpoint.json  globus_tokens.json
"""

from __future__ import annotations

import pathlib

CONFIG_FILE = "config.yaml"
TEMPLATE_FILE = "user_config_template.yaml.j2"
SCHEMA_FILE = "user_config_schema.json"
USER_ENV_FILE = "user_environment.yaml"
IDMAP_FILE = "example_identity_mapping_config.json"
IDMAP_CUSTOM = "identity_mapping_config.json"  # upstream's name for an identity mapping the admin supplied
POLICY_FILE = "helper-policy.toml"
KEY_FILE = "helper.key"
ENDPOINT_FILE = "endpoint.json"  # upstream's (NAME/) and the broker's own record (NAME/run/)
STATIC_REGISTRATION = "registration.json"
LOG_FILE = "endpoint.log"
AUDIT_FILE = "audit.log"
RUN_DIR = "run"
SOCKET_FILE = "admin.sock"
LOCK_FILE = "mep.lock"
JOURNAL_FILE = "inflight.json"
TOKEN_FILE = "globus_tokens.json"


def run_dir(conf_dir) -> pathlib.Path:
    return pathlib.Path(conf_dir) / RUN_DIR


def config_file(conf_dir) -> pathlib.Path:
    return pathlib.Path(conf_dir) / CONFIG_FILE


def policy_file(conf_dir) -> pathlib.Path:
    return pathlib.Path(conf_dir) / POLICY_FILE


def log_file(conf_dir) -> pathlib.Path:
    return pathlib.Path(conf_dir) / LOG_FILE


def default_audit_file(conf_dir) -> pathlib.Path:
    return pathlib.Path(conf_dir) / AUDIT_FILE


def socket_file(conf_dir) -> pathlib.Path:
    return run_dir(conf_dir) / SOCKET_FILE


def lock_file(conf_dir) -> pathlib.Path:
    return run_dir(conf_dir) / LOCK_FILE


def journal_file(conf_dir) -> pathlib.Path:
    return run_dir(conf_dir) / JOURNAL_FILE


def token_file(conf_dir) -> pathlib.Path:
    return run_dir(conf_dir) / TOKEN_FILE


def saved_endpoint_file(conf_dir) -> pathlib.Path:
    """The broker's record of its registration (it may write only run/)."""
    return run_dir(conf_dir) / ENDPOINT_FILE


def upstream_endpoint_file(conf_dir) -> pathlib.Path:
    """Upstream's endpoint.json, in the (root-owned) directory itself."""
    return pathlib.Path(conf_dir) / ENDPOINT_FILE


def static_registration_file(conf_dir) -> pathlib.Path:
    return pathlib.Path(conf_dir) / STATIC_REGISTRATION


def resolve(conf_dir, value) -> pathlib.Path:
    """A path from config.yaml: `~` expanded, relative paths taken from the directory."""
    return pathlib.Path(conf_dir) / pathlib.Path(value).expanduser()
