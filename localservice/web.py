"""The REST routes of the Globus Compute web service that the SDK's Executor and the
MEP's registration call, with the same paths and response shapes.

Authentication stands in for Globus Auth: each bearer token maps to an identity set in a
local JSON file (see `load_identities`); the first identity is the caller.
"""

from __future__ import annotations

import json
import logging
import pathlib

from aiohttp import web

from localservice.service import ComputeService, ServiceError

log = logging.getLogger("localservice")
API_VERSION = "1.0.0"
MIN_VERSION = "2.0.0"


def load_identities(path: pathlib.Path) -> dict:
    """{"tokens": {"<bearer token>": [identity, ...]}}; an identity has at least "id"
    and "username", as Globus Auth's identity objects do."""
    doc = json.loads(path.read_text())
    tokens = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(tokens, dict) or not all(isinstance(v, list) and v and all("id" in i for i in v)
                                               for v in tokens.values()):
        raise ValueError(f"{path}: expected {{\"tokens\": {{TOKEN: [{{\"id\": ..., \"username\": ...}}, ...]}}}}")
    return tokens


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "error": message, "message": message, "http_status_code": status},
                             status=status)


@web.middleware
async def errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ServiceError as e:
        log.info("%s %s -> %d %s: %s", request.method, request.path, e.status, e.code, e)
        return error(e.status, e.code, str(e))
    except json.JSONDecodeError as e:
        return error(400, "BAD_REQUEST", f"invalid JSON body: {e}")


def make_app(service: ComputeService, tokens: dict) -> web.Application:
    """`tokens`: load_identities() of the file, read once at start."""
    app = web.Application(middlewares=[errors], client_max_size=10 * 1024 * 1024)

    def caller(request: web.Request) -> list:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        identity_set = tokens.get(token) if scheme == "Bearer" else None
        if not identity_set:
            raise ServiceError(401, "UNAUTHORIZED", "missing or unknown bearer token")
        return identity_set

    async def version(request):
        return web.json_response({"api": API_VERSION, "min_sdk_version": MIN_VERSION, "min_ep_version": MIN_VERSION,
                                  "service": "mep local compute service"})

    async def register_endpoint(request):
        return web.json_response(await service.register_endpoint(caller(request)[0], await request.json()))

    async def update_endpoint(request):
        endpoint_id = request.match_info["endpoint_id"]
        return web.json_response(await service.register_endpoint(caller(request)[0], await request.json(), endpoint_id))

    async def endpoint_status(request):
        caller(request)
        mep = service.endpoint(request.match_info["endpoint_id"])
        return web.json_response({"status": "online", "details": {"display_name": mep.display_name}})

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
                                                      await request.json()))

    async def result_url(request):
        return web.json_response(await service.result_connection(caller(request)[0]))

    async def task(request):
        return web.json_response(service.task_status(caller(request)[0], request.match_info["task_id"]))

    async def batch_status(request):
        identity = caller(request)[0]
        ids = (await request.json()).get("task_ids", [])
        return web.json_response({"response": "batch", "results": {t: service.task_status(identity, t) for t in ids}})

    app.add_routes([
        web.get("/v2/version", version),
        web.post("/v3/endpoints", register_endpoint),
        web.put("/v3/endpoints/{endpoint_id}", update_endpoint),
        web.get("/v2/endpoints/{endpoint_id}/status", endpoint_status),
        web.get("/v3/endpoints/{endpoint_id}/allowed_functions", allowed_functions),
        web.post("/v3/functions", register_function),
        web.post("/v3/endpoints/{endpoint_id}/submit", submit),
        web.get("/v2/get_amqp_result_connection_url", result_url),
        web.get("/v2/tasks/{task_id}", task),
        web.post("/v2/batch_status", batch_status),
    ])
    return app
