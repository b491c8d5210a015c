"""How the broker logs in to Globus: globus-sdk's GlobusApp, as upstream's MEP does.

- Client credentials (the default for a service): GLOBUS_COMPUTE_CLIENT_ID and
  GLOBUS_COMPUTE_CLIENT_SECRET in the broker's environment (upstream's names), or the
  same two `NAME=value` lines in the file named by `client_credentials_file` in
  config.yaml (root-owned, group the broker, mode 0640: the broker can read the secret
  and cannot change it). A ClientApp then gets its tokens with the client credentials
  grant whenever they are missing or expired.
- Otherwise a user's login: `mepctl login NAME` runs the seed's UserApp flow ("Please
  authenticate with Globus here", a code pasted back) once; the broker then uses and
  renews the refresh token it left, and never starts a login itself: a missing or
  revoked login is an error that says to run `mepctl login NAME` again.

Tokens live in a globus-sdk JSONTokenStorage at NAME/run/globus_tokens.json: run/ is the
broker account's own directory (0700), so only root and the broker can read it, and the
broker can write it when tokens renew. Namespaces are upstream's (`user/ENV`,
`clientprofile/ENV/CLIENT_ID`), so one file holds both kinds.

The Auth service is the environment's (`environment` in config.yaml, else
GLOBUS_SDK_ENVIRONMENT, else production); `auth_service_url` in config.yaml sets
GLOBUS_SDK_SERVICE_URL_AUTH for the broker, the variable a user sets to select a
non-production Auth (the local service's, in the tests and the demo).
"""

from __future__ import annotations

import os
import platform
import stat

import globus_sdk
from globus_sdk.scopes import AuthScopes, ComputeScopes
from globus_sdk.token_storage import JSONTokenStorage

from broker import layout
from broker.layout import TOKEN_FILE  # noqa: F401 - mepctl names it

ID_VAR, SECRET_VAR = "GLOBUS_COMPUTE_CLIENT_ID", "GLOBUS_COMPUTE_CLIENT_SECRET"
# upstream's (globus_compute_endpoint.auth.get_globus_app_with_scopes)
SCOPES = {ComputeScopes.resource_server: [ComputeScopes.all],
          AuthScopes.resource_server: [AuthScopes.openid, AuthScopes.manage_projects]}
NATIVE_CLIENT_ID = "4cf29807-cf21-49ec-9443-ff9a3fb9f81c"  # the Globus Compute SDK's, as upstream's UserApp


class LoginError(Exception):
    """No usable Globus credential; the message says what to run or fix."""


def environment(config) -> str:
    return config.environment or os.environ.get("GLOBUS_SDK_ENVIRONMENT") or "production"


def select_auth(config) -> None:
    if getattr(config, "auth_service_url", None):
        os.environ["GLOBUS_SDK_SERVICE_URL_AUTH"] = config.auth_service_url.rstrip("/") + "/"


def token_file(config):
    return layout.token_file(config.conf_dir)


def client_credentials(config) -> tuple[str, str] | None:
    """(client id, secret) from the environment, else from client_credentials_file."""
    cid, secret = os.environ.get(ID_VAR), os.environ.get(SECRET_VAR)
    if cid and secret:
        return cid, secret
    if secret:
        raise LoginError(f"{SECRET_VAR} is set but {ID_VAR} is not: set both to use a client identity, or neither")
    path = getattr(config, "client_credentials_file", None)
    if path is None:
        return None
    try:
        st = os.stat(path)
        text = path.read_text()
    except OSError as e:
        raise LoginError(f"{path} (client_credentials_file in {config.conf_dir / 'config.yaml'}): cannot read it "
                         f"({e.strerror}); it must be root-owned, group the broker account, mode 0640") from None
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IRWXO):
        raise LoginError(f"{path}: holds a client secret, so it must be owned by root and not writable by its group "
                         f"nor readable by others (chown root:BROKER-GROUP; chmod 0640); it is uid {st.st_uid}, mode "
                         f"{stat.S_IMODE(st.st_mode):04o}")
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    if not values.get(ID_VAR) or not values.get(SECRET_VAR):
        raise LoginError(f"{path}: expected two lines, {ID_VAR}=<client id> and {SECRET_VAR}=<client secret>")
    return values[ID_VAR], values[SECRET_VAR]


def _refuse_login(app, error) -> None:
    """The broker's UserApp never runs a login flow: it has no terminal and no user."""
    raise LoginError(f"the stored Globus login cannot be used ({type(error).__name__}: {error}); "
                     f"run `mepctl login {app.app_name}` as root to log in again")


def make_app(config, *, for_login: bool = False) -> globus_sdk.GlobusApp:
    """The broker's GlobusApp, or (for_login) the UserApp that `mepctl login` runs."""
    select_auth(config)
    env = environment(config)
    creds = None if for_login else client_credentials(config)
    namespace = f"clientprofile/{env}/{creds[0]}" if creds else f"user/{env}"
    storage = JSONTokenStorage(token_file(config), namespace=namespace)
    if creds:
        app = globus_sdk.ClientApp(platform.node(), client_id=creds[0], client_secret=creds[1],
                                   config=globus_sdk.GlobusAppConfig(token_storage=storage, environment=env))
    else:
        options = {} if for_login else {"token_validation_error_handler": _refuse_login}
        app = globus_sdk.UserApp(config.name, client_id=NATIVE_CLIENT_ID, config=globus_sdk.GlobusAppConfig(
            token_storage=storage, environment=env, request_refresh_tokens=True, **options))
    app.add_scope_requirements(SCOPES)
    return app


def has_login(config) -> bool:
    """Whether `mepctl login NAME` left tokens for this environment."""
    try:
        storage = JSONTokenStorage(token_file(config), namespace=f"user/{environment(config)}")
        return bool(storage.get_token_data_by_resource_server())
    except (OSError, ValueError):
        return False


def forget_client_tokens(config) -> None:
    """After the service refused a ClientApp's token (revoked before it expired): drop
    it, so the next attempt gets a new one, or Auth's clear refusal. A user's login is
    kept: its refresh token is the only way back without `mepctl login`."""
    try:
        creds = client_credentials(config)
    except LoginError:
        return
    if creds:
        storage = JSONTokenStorage(token_file(config), namespace=f"clientprofile/{environment(config)}/{creds[0]}")
        for resource_server in SCOPES:
            storage.remove_token_data(resource_server)


def describe_refusal(config, error: globus_sdk.GlobusAPIError) -> str:
    """What Auth's refusal means for this MEP, and what to run."""
    creds = client_credentials(config)
    where = (f"{ID_VAR}/{SECRET_VAR}" if os.environ.get(ID_VAR) else
             f"{config.client_credentials_file}") if creds else None
    what = f"HTTP {error.http_status} {error.code}: {error.message}"
    if creds:
        return (f"Globus Auth refused the client credentials of client {creds[0]} ({what}); the secret was deleted or "
                f"is wrong: create a new one for that client and put it in {where}, then `mepctl start "
                f"{config.name}` (or wait: the broker tries again)")
    return (f"Globus Auth refused the stored login ({what}); it expired or was revoked: run `mepctl login "
            f"{config.name}` as root")


def login(config, broker_uid: int, broker_gid: int) -> str:
    """`mepctl login NAME`: the interactive UserApp flow; the tokens go to the token file,
    owned by the broker account (mode 0600). Returns the identity id logged in."""
    path = token_file(config)
    app = make_app(config, for_login=True)
    app.login(force=True)
    os.chown(path, broker_uid, broker_gid)
    os.chmod(path, 0o600)
    return str(app.token_storage.identity_id)
