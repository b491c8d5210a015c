"""Stage 4 of a start (broker/pipeline.py): the rendered config -> a running UEP.

`spawn` assembles what the UEP is given (its environment: the admin's
user_environment.yaml, its name, the user's runtime; its stdin document: upstream's
`_start-user-endpoint` input with a fresh Fernet key), checks both against the helper's
limits where the user or the admin can fix them, asks the root helper to start it, and
hands it its credentials through the credential memfd.
"""

from __future__ import annotations

import os

import yaml
from cryptography.fernet import Fernet

from broker import limits, notices
from broker.commands import StartCommand
from broker.config import MEPConfig
from broker.helper_client import HelperClient, HelperRefused, InvalidRequest
from broker.mapping import Account
from broker.refusal import Refused
from broker.registry import UEP, stdin_document
from broker.templates import Rendered

ENV_BROKEN = "the endpoint's user environment file is broken; contact the endpoint administrator"


def load_user_environment(path) -> dict:
    """user_environment.yaml: flat `NAME: value` pairs for every UEP's environment, each
    within the helper's limits (a name such as MY-VAR would otherwise reach the helper)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as e:
        raise Refused(ENV_BROKEN, f"{path}: {e}") from None
    if not isinstance(data, dict) or any(isinstance(v, (dict, list)) for v in data.values()):
        raise Refused(ENV_BROKEN, f"{path}: must be flat `NAME: value` pairs")
    env = {str(k): "" if v is None else str(v) for k, v in data.items()}
    try:
        return limits.environment(env, path.name)
    except limits.LimitBroken as e:
        raise Refused(f"{ENV_BROKEN} ({e})", str(e), file=str(path)) from None


def runtime_environment(cmd: StartCommand) -> dict:
    """What the UEP is told of the user's runtime, each value checked where it enters."""
    python, env = cmd.user_runtime.get("python"), {}  # a dict: render() refused anything else
    for name, label, value in (
            ("GC_USER_PYTHON_VERSION", "user_runtime.python.version", python.get("version") if isinstance(python, dict) else None),
            ("GC_USER_SDK_VERSION", "user_runtime.globus_compute_sdk_version", cmd.user_runtime.get("globus_compute_sdk_version"))):
        if isinstance(value, str):
            env[name] = limits.env_value(label, value)
    return env


async def spawn(helper: HelperClient, config: MEPConfig, cmd: StartCommand, account: Account, rendered: Rendered,
                audit: bool) -> UEP:
    """The started UEP (not yet in the fleet), or Refused. HelperGone passes through."""
    env = load_user_environment(config.user_environment_path)
    env.setdefault("GLOBUS_COMPUTE_ENDPOINT_NAME", cmd.name)
    enckey = Fernet.generate_key()
    try:
        for name, value in runtime_environment(cmd).items():
            env.setdefault(name, value)
        limits.environment(env, "the user endpoint's environment")
        stdin = limits.stdin_size(stdin_document(
            amqp_creds=cmd.amqp_creds, config_text=rendered.text, posix_ppid=os.getpid(),
            candidates=account.mapped.candidates, matched_identity=account.mapped.identity, enckey=enckey,
            allowed_functions=config.allowed_functions, audit=audit),
            "the rendered user endpoint configuration with its credentials")
        result = await helper.spawn(account.username, account.uid, cmd.name, env, stdin,
                                    ("cred", "audit") if audit else ("cred",))
    except (limits.LimitBroken, InvalidRequest) as e:
        raise Refused(notices.start_failed(account.username, str(e)), f"over a limit of the helper protocol: {e}",
                      user=account.username) from None
    except HelperRefused as e:
        raise Refused(notices.start_failed(account.username, f"({e.code}) {e.reason}; see your system administrator"),
                      f"helper refused: ({e.code}) {e.reason}", user=account.username) from None
    uep = UEP(name=cmd.name, username=account.username, uid=account.uid, pid=result.pid, endpoint_id=cmd.endpoint_id,
              identity=account.mapped.identity, enckey=enckey, cred_fd=result.fds.get("cred"),
              audit_pipe=result.fds.get("audit"))
    uep.write_credentials(cmd.amqp_creds)
    return uep
