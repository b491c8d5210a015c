"""Globus Auth, in small: the OAuth2 routes globus-sdk calls, so that a GlobusApp (the
broker's ClientApp, `mepctl login`'s UserApp, upstream's own MEP) logs in against the
stand-in exactly as against auth.globus.org, selected the way a user selects a
non-production environment (GLOBUS_SDK_SERVICE_URL_AUTH).

What it does: client credentials for the confidential clients named in the identities
file; the authorization code grant with PKCE for native clients (the "login" is picking
one of the file's identities: there are no passwords here); refresh tokens; a signed
id_token (RS256, a key made at start and published as JWKS); userinfo, introspection and
revocation. Access tokens expire after `token_lifetime` seconds (tests use a few).

Revocation as an administrator does it: the identities file is read again when it
changes, and a client whose secret changed (or that was removed) loses the tokens it got
with the old secret, as does everything derived from them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import pathlib
import secrets
import time
import uuid

import attrs
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger("localservice")

COMPUTE_RESOURCE_SERVER = "funcx_service"
COMPUTE_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
AUTH_RESOURCE_SERVER = "auth.globus.org"
AUTH_SCOPES = {"openid", "profile", "email", "urn:globus:auth:scope:auth.globus.org:view_identities",
               "urn:globus:auth:scope:auth.globus.org:view_identity_set",
               "urn:globus:auth:scope:auth.globus.org:manage_projects"}
NATIVE_CLIENTS = ("4cf29807-cf21-49ec-9443-ff9a3fb9f81c",)  # the Globus Compute SDK's own (native) client id
CODE_LIFETIME_S = 600
CLIENT_IDP = "bdd29d2a-7e4b-4c4b-a1bb-3d0bc0e1f5aa"  # stands in for Globus Auth's "clients" identity provider


class AuthError(Exception):
    """An OAuth2 error reply: {"error": code, "error_description": message}."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


def resource_server(scope: str) -> str:
    base = scope.split("[", 1)[0]  # a dependent-scope suffix does not change the resource server
    if base in AUTH_SCOPES:
        return AUTH_RESOURCE_SERVER
    if base == COMPUTE_SCOPE:
        return COMPUTE_RESOURCE_SERVER
    raise AuthError(400, "invalid_scope", f"unknown scope {scope!r} (this service knows {COMPUTE_SCOPE} and the "
                    "auth.globus.org scopes)")


def client_identity(client_id: str) -> dict:
    """A confidential client acts as its own identity, as in Globus Auth."""
    return {"id": client_id, "sub": client_id, "username": f"{client_id}@clients.auth.globus.org",
            "name": f"client {client_id}", "identity_provider": CLIENT_IDP, "status": "used", "email": None}


@attrs.define
class Grant:
    """What one login or client-credentials call granted: the identity set, the client,
    the scopes by resource server; the secret's digest ties it to the secret it used."""
    identity_set: list
    client_id: str
    scopes: dict  # resource server -> [scope]
    secret_digest: str | None = None
    revoked: bool = False
    authenticated_at: float = attrs.field(factory=time.time)  # the login (or client credentials grant)


@attrs.define
class AccessToken:
    grant: Grant
    resource_server: str
    expires_at: float


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class AuthService:
    def __init__(self, identities_path: pathlib.Path, base_url: str, token_lifetime: float = 172800):
        self.path, self.base_url, self.token_lifetime = identities_path, base_url.rstrip("/"), token_lifetime
        self._mtime = None
        self.static_tokens: dict = {}
        self.clients: dict[str, str | None] = {}  # client id -> secret digest (None: a native client)
        self.logins: dict[str, list] = {}
        self.access: dict[str, AccessToken] = {}
        self.refresh: dict[str, tuple[Grant, str]] = {}  # refresh token -> (grant, resource server)
        self.codes: dict[str, dict] = {}
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_hex(8)
        self.reload()

    # -- the identities file -----------------------------------------------------------

    def reload(self) -> None:
        """Read the identities file if it changed; a client whose secret changed or that
        is gone loses its grants."""
        mtime = self.path.stat().st_mtime_ns
        if mtime == self._mtime:
            return
        doc = load(self.path)
        self._mtime = mtime
        self.static_tokens = doc["tokens"]
        clients = {str(uuid.UUID(cid)): _digest(c["secret"]) for cid, c in doc.get("clients", {}).items()}
        clients.update({str(uuid.UUID(cid)): None for cid in doc.get("native_clients", NATIVE_CLIENTS)})
        for grant in self._grants():
            if grant.secret_digest is not None and clients.get(grant.client_id) != grant.secret_digest:
                grant.revoked = True
                log.info("client %s: secret changed or client removed; its tokens are revoked", grant.client_id)
        self.clients = clients
        self.logins = {ids[0]["username"]: ids for ids in self.static_tokens.values()}
        self.logins.update(doc.get("logins", {}))

    def _grants(self) -> list:
        grants = [t.grant for t in self.access.values()] + [g for g, _ in self.refresh.values()]
        return list({id(g): g for g in grants}.values())

    # -- who is calling ----------------------------------------------------------------

    def identity_set(self, token: str, resource_server: str = COMPUTE_RESOURCE_SERVER) -> list | None:
        """The identity set behind a bearer token (a static one, or an access token this
        service issued for `resource_server`, unexpired and not revoked), else None."""
        self.reload()
        if token in self.static_tokens:
            return self.static_tokens[token]
        access = self.access.get(token)
        if access is None or access.grant.revoked or access.resource_server != resource_server:
            return None
        if access.expires_at < time.time():
            return None
        return access.grant.identity_set

    def authenticated_at(self, token: str) -> dict:
        """identity id -> when the login behind `token` happened (for a policy's
        authentication_assurance_timeout); empty for a static token, whose identities say
        it themselves (`last_authentication`)."""
        access = self.access.get(token)
        if access is None:
            return {}
        return {i["id"]: access.grant.authenticated_at for i in access.grant.identity_set}

    def authenticate_client(self, headers, form) -> tuple[str, str | None]:
        """(client id, secret digest) from HTTP Basic (confidential) or the form's
        client_id (native)."""
        self.reload()
        header = headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
                client_id = str(uuid.UUID(client_id))
            except ValueError:
                raise AuthError(401, "invalid_client", "malformed client credentials") from None
            if self.clients.get(client_id) is None or self.clients[client_id] != _digest(secret):
                raise AuthError(401, "invalid_client", f"client {client_id}: unknown client or wrong secret")
            return client_id, _digest(secret)
        client_id = form.get("client_id", "")
        try:
            client_id = str(uuid.UUID(client_id))
        except ValueError:
            raise AuthError(401, "invalid_client", "no client authentication") from None
        if client_id not in self.clients or self.clients[client_id] is not None:
            raise AuthError(401, "invalid_client", f"client {client_id}: not a native client here; authenticate "
                            "with its secret")
        return client_id, None

    # -- the token endpoint ------------------------------------------------------------

    def token(self, headers, form) -> dict:
        client_id, digest = self.authenticate_client(headers, form)
        grant_type = form.get("grant_type")
        if grant_type == "client_credentials":
            if digest is None:
                raise AuthError(401, "unauthorized_client", "client_credentials needs a confidential client")
            scopes = _by_resource_server(form.get("scope", ""))
            grant = Grant([client_identity(client_id)], client_id, scopes, digest)
            log.info("client_credentials: client %s, scopes %s", client_id, sorted(scopes))
            return self._response(grant, scopes, refresh=False, client_id=client_id)
        if grant_type == "authorization_code":
            code = self.codes.pop(form.get("code", ""), None)
            if code is None or code["expires_at"] < time.time():
                raise AuthError(400, "invalid_grant", "unknown, used or expired authorization code")
            if code["client_id"] != client_id or code["redirect_uri"] != form.get("redirect_uri"):
                raise AuthError(400, "invalid_grant", "the code was issued to another client or redirect_uri")
            if code["challenge"] is not None:
                verifier = form.get("code_verifier", "")
                want = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
                if want != code["challenge"]:
                    raise AuthError(400, "invalid_grant", "PKCE verification failed (code_verifier)")
            elif digest is None:
                raise AuthError(400, "invalid_request", "a native client must use PKCE")
            grant = Grant(code["identity_set"], client_id, code["scopes"], digest)
            log.info("authorization_code: %s via client %s", grant.identity_set[0]["username"], client_id)
            return self._response(grant, code["scopes"], refresh=code["offline"], client_id=client_id,
                                  state=code["state"])
        if grant_type == "refresh_token":
            held = self.refresh.get(form.get("refresh_token", ""))
            if held is None or held[0].revoked or held[0].client_id != client_id:
                raise AuthError(400, "invalid_grant", "unknown or revoked refresh token")
            grant, rs = held
            log.info("refresh_token: %s via client %s (%s)", grant.identity_set[0]["username"], client_id, rs)
            out = self._token(grant, rs)
            out["refresh_token"] = form["refresh_token"]
            return {**out, "other_tokens": []}
        raise AuthError(400, "unsupported_grant_type", f"grant_type {grant_type!r} is not supported")

    def _token(self, grant: Grant, rs: str) -> dict:
        token = secrets.token_urlsafe(32)
        self.access[token] = AccessToken(grant, rs, time.time() + self.token_lifetime)
        self._expire()
        return {"access_token": token, "expires_in": int(self.token_lifetime), "resource_server": rs,
                "scope": " ".join(grant.scopes[rs]), "token_type": "Bearer"}

    def _response(self, grant: Grant, scopes: dict, refresh: bool, client_id: str, state: str = "_default") -> dict:
        tokens = []
        for rs in sorted(scopes, key=lambda r: r != AUTH_RESOURCE_SERVER):  # auth.globus.org first, as Auth does
            one = {**self._token(grant, rs), "state": state}
            if refresh:
                one["refresh_token"] = secrets.token_urlsafe(32)
                self.refresh[one["refresh_token"]] = (grant, rs)
            tokens.append(one)
        first = tokens[0]
        if "openid" in scopes.get(AUTH_RESOURCE_SERVER, []):
            first["id_token"] = self.id_token(grant.identity_set, client_id)
        return {**first, "other_tokens": tokens[1:]}

    def _expire(self) -> None:
        now = time.time()
        for token in [t for t, a in self.access.items() if a.expires_at < now - 3600]:
            del self.access[token]

    # -- the authorization code grant --------------------------------------------------

    def authorize(self, query) -> tuple[str, str]:
        """The user "logs in" as `username` (one of the file's identities): returns the
        redirect URI and the code it is sent with."""
        self.reload()
        client_id = query.get("client_id", "")
        if client_id not in self.clients:
            raise AuthError(400, "invalid_client", f"unknown client_id {client_id!r}")
        if query.get("response_type") != "code":
            raise AuthError(400, "unsupported_response_type", "response_type must be code")
        username = query.get("username")
        if username not in self.logins:
            raise AuthError(401, "access_denied", f"no identity {username!r} to log in as (known: "
                            f"{', '.join(sorted(self.logins))})")
        challenge = query.get("code_challenge")
        if challenge is not None and query.get("code_challenge_method") != "S256":
            raise AuthError(400, "invalid_request", "code_challenge_method must be S256")
        code = secrets.token_urlsafe(24)
        self.codes[code] = {"client_id": client_id, "redirect_uri": query.get("redirect_uri"), "challenge": challenge,
                            "scopes": _by_resource_server(query.get("scope", "")), "identity_set": self.logins[username],
                            "offline": query.get("access_type") == "offline", "state": query.get("state", "_default"),
                            "expires_at": time.time() + CODE_LIFETIME_S}
        return query.get("redirect_uri") or f"{self.base_url}/v2/web/auth-code", code

    # -- OpenID Connect ----------------------------------------------------------------

    def id_token(self, identity_set: list, client_id: str) -> str:
        me, now = identity_set[0], int(time.time())
        claims = {"iss": self.base_url, "sub": me["id"], "aud": client_id, "iat": now, "exp": now + 172800,
                  "preferred_username": me.get("username"), "name": me.get("name"), "email": me.get("email"),
                  "identity_provider": me.get("identity_provider"), "identity_set": [_oidc(i) for i in identity_set]}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def openid_configuration(self) -> dict:
        b = self.base_url
        return {"issuer": b, "authorization_endpoint": f"{b}/v2/oauth2/authorize", "token_endpoint": f"{b}/v2/oauth2/token",
                "userinfo_endpoint": f"{b}/v2/oauth2/userinfo", "revocation_endpoint": f"{b}/v2/oauth2/token/revoke",
                "introspection_endpoint": f"{b}/v2/oauth2/token/introspect", "jwks_uri": f"{b}/jwk.json",
                "response_types_supported": ["code"], "grant_types_supported":
                    ["authorization_code", "client_credentials", "refresh_token"],
                "subject_types_supported": ["public"], "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": sorted(AUTH_SCOPES | {COMPUTE_SCOPE}), "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"]}

    def jwks(self) -> dict:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}]}

    def userinfo(self, token: str) -> dict:
        ids = self.identity_set(token, AUTH_RESOURCE_SERVER)
        if ids is None:
            raise AuthError(401, "invalid_token", "missing, unknown or expired access token")
        me = _oidc(ids[0])
        return {**me, "identity_set": [_oidc(i) for i in ids]}

    def introspect(self, headers, form) -> dict:
        self.authenticate_client(headers, form)
        access = self.access.get(form.get("token", ""))
        if access is None or access.grant.revoked or access.expires_at < time.time():
            return {"active": False}
        me = access.grant.identity_set[0]
        out = {"active": True, "scope": " ".join(access.grant.scopes[access.resource_server]),
               "client_id": access.grant.client_id, "sub": me["id"], "username": me.get("username"),
               "name": me.get("name"), "email": me.get("email"), "exp": int(access.expires_at),
               "aud": [access.resource_server], "iss": self.base_url, "token_type": "Bearer"}
        if "identity_set" in form.get("include", ""):
            out["identity_set"] = [i["id"] for i in access.grant.identity_set]
        return out

    def revoke(self, headers, form) -> dict:
        self.authenticate_client(headers, form)
        token = form.get("token", "")
        if token in self.refresh:
            self.refresh[token][0].revoked = True
        elif token in self.access:
            del self.access[token]
        return {"active": False}


def _oidc(identity: dict) -> dict:
    return {"sub": identity["id"], "preferred_username": identity.get("username"), "name": identity.get("name"),
            "email": identity.get("email"), "identity_provider": identity.get("identity_provider"),
            "identity_provider_display_name": "mep local service", "organization": None,
            "last_authentication": int(time.time())}


def _by_resource_server(scope: str) -> dict:
    scopes: dict[str, list] = {}
    for s in scope.split():
        scopes.setdefault(resource_server(s), []).append(s)
    if not scopes:
        raise AuthError(400, "invalid_scope", "no scope requested")
    return scopes


def load(path: pathlib.Path) -> dict:
    """The identities file:

        {"tokens": {"<bearer token>": [identity, ...]},        static tokens (the demo, the tests)
         "clients": {"<client id>": {"secret": "..."}},         confidential clients (client credentials)
         "native_clients": ["<client id>", ...],                 default: the Globus Compute SDK's client
         "logins": {"<username>": [identity, ...]}}              whom a login may pick (default: each
                                                                  token's first identity)

    an identity has at least "id" and "username", as Globus Auth's identity objects do."""
    doc = json.loads(path.read_text())
    tokens = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(tokens, dict) or not all(isinstance(v, list) and v and all("id" in i for i in v)
                                               for v in tokens.values()):
        raise ValueError(f"{path}: expected {{\"tokens\": {{TOKEN: [{{\"id\": ..., \"username\": ...}}, ...]}}}}")
    for cid, c in doc.get("clients", {}).items():
        if not isinstance(c, dict) or not isinstance(c.get("secret"), str):
            raise ValueError(f"{path}: clients.{cid}: expected {{\"secret\": \"...\"}}")
    return doc
