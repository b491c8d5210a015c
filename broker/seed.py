"""The files `mepctl configure --multi-user NAME` writes, with comments for the admin."""

CONFIG = """\
# The multi-user endpoint's own settings (upstream's keys; see README and docs/).
# The settings of each user's endpoint live in user_config_template.yaml.j2.
display_name: {display_name}

# The port of the command queue (AMQPS); 443 passes most site firewalls. Leave it out to
# take the port the service names at registration.
amqp_port: 443

# How Globus identities map to local accounts (required: this endpoint changes users).
# Edits are picked up while the endpoint runs; an invalid edit is refused and logged.
identity_mapping_config_path: {idmap_path}

# The template and schema are re-read at every user endpoint start.
user_config_template_path: user_config_template.yaml.j2
user_config_schema_path: user_config_schema.json
{high_assurance}{allowed_functions}
# PAM is decided by the root helper's policy ({policy_path}); this mirrors it.
pam:
  enable: {pam_enable}
  service_name: {pam_service}

# debug: true
"""

HIGH_ASSURANCE = """
# High assurance: fixed at registration; create a new endpoint to change it.
high_assurance: true
subscription_id: {subscription_id}
{auth_policy}audit_log_path: {audit_log_path}
"""

IDMAP_EXAMPLE = """\
[
  {
    "comment": "For more examples, see: https://docs.globus.org/globus-connect-server/v5.4/identity-mapping-guide/",
    "DATA_TYPE": "external_identity_mapping#1.0.0",
    "command": ["/bin/false", "--some", "flag", "-a", "-b", "-c"]
  },
  {
    "comment": "For more examples, see: https://docs.globus.org/globus-connect-server/v5.4/identity-mapping-guide/",
    "DATA_TYPE": "expression_identity_mapping#1.0.0",
    "mappings": [
      {
        "source": "{username}",
        "match": "(.*)@example.com",
        "output": "{0}"
      }
    ]
  }
]
"""  # the seed's own example, as upstream writes it: the failing external mapper is skipped

USER_CONFIG_TEMPLATE = """\
{#-
  The template for each user endpoint (UEP). It is rendered for every start with the
  options the user passes as `user_endpoint_config`, validated first against
  user_config_schema.json. User values always arrive as quoted YAML strings, so they
  cannot change the structure of this file.

  Reserved variables: _GC.mapped_identity.local.{uname,uid,gid,dir,shell,groups},
  _GC.mapped_identity.globus.id, _GC.user_runtime (the user's Python and SDK versions).

  This default runs tasks in a worker pool on this host (GlobusComputeEngine with a
  LocalProvider, talking over the loopback: no scheduler and no internet needed). For
  Slurm or PBS, swap the provider for a SlurmProvider or PBSProProvider: see
  docs/examples/ and the Globus Compute endpoint documentation.
-#}
engine:
  type: GlobusComputeEngine
  max_workers_per_node: {{ max_workers | default(2) }}
  address: 127.0.0.1
  provider:
    type: LocalProvider
    init_blocks: 1
    min_blocks: 0
    max_blocks: 1

# Stop an idle user endpoint after this many idle heartbeats (30 s each by default);
# the next task starts a fresh one.
idle_heartbeats_soft: {{ idle_heartbeats_soft | default(10) }}
idle_heartbeats_hard: {{ idle_heartbeats_hard | default(5760) }}
"""

USER_CONFIG_SCHEMA = """\
{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "properties": {
    "max_workers": { "type": "integer", "minimum": 1, "maximum": 64 },
    "idle_heartbeats_soft": { "type": "integer", "minimum": 1 },
    "idle_heartbeats_hard": { "type": "integer", "minimum": 1 }
  },
  "additionalProperties": true
}
"""

USER_ENVIRONMENT = """\
# Environment variables for every user endpoint process: flat NAME: value pairs.
# HOME, USER, LOGNAME and SHELL come from the user's passwd entry and cannot be set
# here; names on the helper's deny-list (LD_*, PYTHON*, ...) refuse the start.
#
# Example:
#     SITE_SCRATCH: /scratch
"""

POLICY = """\
# The root helper's policy (docs/policy.md). Root-owned; only root may change it.
broker_user = "{broker_user}"
key_file = "{key_file}"
uep_argv = {uep_argv}
broker_argv = {broker_argv}
min_uid = 1000
deny_users = []
deny_groups = []
max_children = 256
max_children_per_user = 4

[pam]
enabled = {pam_enable}
service = "{pam_service}"
"""
