"""Stage 3 of a start (broker/pipeline.py): the mapped account and the user's options ->
the user endpoint's config, rendered from the admin's template (broker/templates.py).

`render` builds the template's context as upstream does (the local account, the Globus
identity that matched, the whole MEP config as `parent_config`), renders, and logs what
the MEP changed and, for `debug: true`, the result. `mepctl render-user-config` calls it
too (broker/admin.py).
"""

from __future__ import annotations

import os
import pathlib

import attrs

from broker import notices, templates
from broker.config import MEPConfig
from broker.mapping import Account
from broker.refusal import Refused


def template_context(config: MEPConfig, account: Account) -> tuple[dict, dict]:
    """`mapped_identity` and `parent_config`, as upstream gives its templates."""
    pw = account.passwd
    identity = {"local": {"uname": pw.pw_name, "uid": pw.pw_uid, "gid": pw.pw_gid, "gecos": pw.pw_gecos,
                          "shell": pw.pw_shell, "dir": pw.pw_dir, "groups": os.getgrouplist(pw.pw_name, pw.pw_gid)},
                "globus": {"id": account.mapped.identity}}
    # the whole MEP config, as upstream gives its templates (`parent_config.amqp_port`, ...)
    parent = {k: str(v) if isinstance(v, pathlib.PurePath) else v
              for k, v in attrs.asdict(config, recurse=True).items()} | {"multi_user": True}
    return identity, parent


def render(config: MEPConfig, account: Account, user_opts, user_runtime, log, uep: str) -> templates.Rendered:
    """The rendered config for one start, or Refused (addressed to the account's user)."""
    identity, parent = template_context(config, account)
    try:
        rendered = templates.render(config.user_config_template_path, config.user_config_schema_path,
                                    user_opts=user_opts, user_runtime=user_runtime, mapped_identity=identity,
                                    parent_config=parent, high_assurance=config.high_assurance,
                                    allowed_functions=config.allowed_functions)
    except Refused as e:
        raise Refused(notices.start_failed(account.username, e.user_message), e.reason, user=account.username) from None
    for what in rendered.overrides:
        log.info("rendered config overridden by the MEP", what=what, uep=uep)
    if rendered.config.get("debug") is True:
        log.info("\n".join(templates.debug_lines(rendered.text)), uep=uep, user=account.username)
    return rendered
