"""The REST routes of the Globus Compute web service that the SDK's Executor and the
MEP's registration call, with the same paths and response shapes.

A bearer token is either a static one from the identities file (mapped to an identity
set there; the first identity is the caller) or an access token that this service's own
Globus Auth routes issued (localservice/auth.py) for the compute resource server.
"""

from __future__ import annotations

import html
import json
import logging
import pathlib
import urllib.parse

from aiohttp import web

from localservice import auth as auth_mod
from localservice.auth import AuthError, AuthService
from localservice.policies import Policies
from localservice.service import ComputeService, ServiceError

log = logging.getLogger("localservice")
API_VERSION = "1.0.0"
MIN_VERSION = "2.0.0"


def load_identities(path: pathlib.Path) -> dict:
    """The static tokens of the identities file (auth.load says what else it holds)."""
    return auth_mod.load(path)["tokens"]


def error(status: int, code: str, message: str, extra: dict | None = None) -> web.Response:
    return web.json_response({"code": code, "error": message, "message": message, "http_status_code": status,
                              **(extra or {})}, status=status)


@web.middleware
async def errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ServiceError as e:
        log.info("%s %s -> %d %s: %s", request.method, request.path, e.status, e.code, e)
        return error(e.status, e.code, str(e), e.extra)
    except AuthError as e:
        log.info("%s %s -> %d %s: %s", request.method, request.path, e.status, e.code, e)
        return web.json_response({"error": e.code, "error_description": str(e),
                                  "errors": [{"code": e.code, "detail": str(e), "status": str(e.status)}]},
                                 status=e.status)
    except json.JSONDecodeError as e:
        return error(400, "BAD_REQUEST", f"invalid JSON body: {e}")


def bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token if scheme == "Bearer" else ""


def make_app(service: ComputeService, auth: AuthService) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=10 * 1024 * 1024)
    policies = service.policies = Policies()

    def caller(request: web.Request) -> list:
        identity_set = auth.identity_set(bearer(request))
        if not identity_set:
            raise ServiceError(401, "UNAUTHORIZED", "missing, unknown or expired bearer token")
        return identity_set

    def authenticated_at(request: web.Request) -> dict:
        return auth.authenticated_at(bearer(request))

    def auth_caller(request: web.Request) -> dict:
        """Who calls Globus Auth's API (projects, policies): a token for auth.globus.org
        (manage_projects), or a static one."""
        identity_set = auth.identity_set(bearer(request), auth_mod.AUTH_RESOURCE_SERVER)
        if not identity_set:
            raise AuthError(401, "UNAUTHORIZED", "missing, unknown or expired bearer token for auth.globus.org")
        return identity_set[0]

    async def version(request):
        return web.json_response({"api": API_VERSION, "min_sdk_version": MIN_VERSION, "min_ep_version": MIN_VERSION,
                                  "service": "mep local compute service"})

    async def register_endpoint(request):
        return web.json_response(await service.register_endpoint(caller(request)[0], await request.json(),
                                                                 user_agent=request.headers.get("User-Agent", "")))

    async def update_endpoint(request):
        endpoint_id = request.match_info["endpoint_id"]
        return web.json_response(await service.register_endpoint(caller(request)[0], await request.json(), endpoint_id,
                                                                 user_agent=request.headers.get("User-Agent", "")))

    async def endpoint_status(request):
        caller(request)
        return web.json_response(service.endpoint_status(request.match_info["endpoint_id"]))

    async def registrations(request):
        """Not a real route: what each registration of this endpoint sent (body and
        User-Agent), for tests that compare the broker with upstream's MEP."""
        caller(request)
        mep = service.endpoint(request.match_info["endpoint_id"])
        return web.json_response([r for r in service.registrations if r["endpoint_id"] == mep.id])

    async def allowed_functions(request):
        caller(request)
        mep = service.endpoint(request.match_info["endpoint_id"])
        return web.json_response({"endpoint_id": mep.id, "restrict_functions": mep.allowed_functions is not None,
                                  "functions": mep.allowed_functions or []})

    async def register_function(request):
        return web.json_response(service.register_function(caller(request)[0], await request.json()))

    async def submit(request):
        identity_set = caller(request)
        return web.json_response(await service.submit(identity_set, request.match_info["endpoint_id"],
                                                      await request.json(), authenticated_at(request)))

    async def result_url(request):
        return web.json_response(await service.result_connection(caller(request)[0]))

    async def task(request):
        return web.json_response(service.task_status(caller(request), request.match_info["task_id"],
                                                     authenticated_at(request)))

    async def batch_status(request):
        identity_set, when = caller(request), authenticated_at(request)
        ids = (await request.json()).get("task_ids", [])
        return web.json_response({"response": "batch",
                                  "results": {t: service.task_status(identity_set, t, when) for t in ids}})

    # -- Globus Auth's projects and policies (localservice/policies.py) --

    async def create_project(request):
        return web.json_response(policies.create_project(auth_caller(request), await request.json()))

    async def get_projects(request):
        auth_caller(request)
        return web.json_response(policies.get_projects())

    async def create_policy(request):
        return web.json_response(policies.create_policy(auth_caller(request), await request.json()))

    async def get_policies(request):
        auth_caller(request)
        return web.json_response(policies.get_policies())

    async def get_policy(request):
        auth_caller(request)
        return web.json_response(policies.get_policy(request.match_info["policy_id"]))

    # -- Globus Auth (localservice/auth.py) --

    async def token(request):
        return web.json_response(auth.token(request.headers, await request.post()))

    async def authorize(request):
        """No passwords here: the login page lists the identities to log in as; picking one
        (`&username=`) sends the code to the redirect URI, as Globus Auth does."""
        if "username" not in request.query:
            links = "".join(f'<li><a href="{html.escape(str(request.url.update_query(username=u)))}">{html.escape(u)}</a>'
                            for u in sorted(auth.logins))
            return web.Response(text=f"<html><body><p>Log in to the mep local service as:</p><ul>{links}</ul>"
                                "</body></html>", content_type="text/html")
        redirect, code = auth.authorize(request.query)
        state = request.query.get("state", "_default")
        raise web.HTTPFound(f"{redirect}{'&' if '?' in redirect else '?'}"
                            f"{urllib.parse.urlencode({'code': code, 'state': state})}")

    async def auth_code_page(request):
        """Where a native app's login ends: the code to paste back (a line of its own)."""
        return web.Response(text=f"Native App Authorization Code\n\n{request.query.get('code', '')}\n")

    async def openid_configuration(request):
        return web.json_response(auth.openid_configuration())

    async def jwks(request):
        return web.json_response(auth.jwks())

    async def userinfo(request):
        return web.json_response(auth.userinfo(bearer(request)))

    async def introspect(request):
        return web.json_response(auth.introspect(request.headers, await request.post()))

    async def revoke(request):
        return web.json_response(auth.revoke(request.headers, await request.post()))

    app.add_routes([
        web.post("/v2/oauth2/token", token),
        web.get("/v2/oauth2/authorize", authorize),
        web.get("/v2/web/auth-code", auth_code_page),
        web.get("/.well-known/openid-configuration", openid_configuration),
        web.get("/jwk.json", jwks),
        web.get("/v2/oauth2/userinfo", userinfo),
        web.post("/v2/oauth2/token/introspect", introspect),
        web.post("/v2/oauth2/token/revoke", revoke),
        web.post("/v2/api/projects", create_project),
        web.get("/v2/api/projects", get_projects),
        web.post("/v2/api/policies", create_policy),
        web.get("/v2/api/policies", get_policies),
        web.get("/v2/api/policies/{policy_id}", get_policy),
        web.get("/v2/version", version),
        web.post("/v3/endpoints", register_endpoint),
        web.put("/v3/endpoints/{endpoint_id}", update_endpoint),
        web.get("/v2/endpoints/{endpoint_id}/status", endpoint_status),
        web.get("/v3/endpoints/{endpoint_id}/registrations", registrations),
        web.get("/v3/endpoints/{endpoint_id}/allowed_functions", allowed_functions),
        web.post("/v3/functions", register_function),
        web.post("/v3/endpoints/{endpoint_id}/submit", submit),
        web.get("/v2/get_amqp_result_connection_url", result_url),
        web.get("/v2/tasks/{task_id}", task),
        web.post("/v2/batch_status", batch_status),
    ])
    return app
