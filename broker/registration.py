"""The MEP's endpoint id and command queue: from the web service at every start, as
upstream does, or from a fixed NAME/registration.json.

Registration goes through globus-sdk's ComputeClientV3 (the same routes and response as
the real service): POST /v3/endpoints the first time, PUT /v3/endpoints/ID afterwards,
so the id is stable and the AMQP credentials are fresh at each start. The id is kept in
NAME/run/endpoint.json, the one directory the broker may write; a root-owned
NAME/endpoint.json (upstream's file, kept by `mepctl configure --from-upstream`) comes
first, so a migrated endpoint keeps the id its users' scripts name. The service is
`compute_service_url`, else http://localhost:5000 with upstream's
`local_compute_services: true`; the bearer token is read from
`compute_service_token_file` (root:broker, 0640).
"""

from __future__ import annotations

import json
import os

import globus_sdk

STATIC = "registration.json"
ENDPOINT_FILE = "endpoint.json"
LOCAL_SERVICE = "http://localhost:5000"


class RegistrationError(Exception):
    pass


def service_url(config) -> str | None:
    return config.compute_service_url or (LOCAL_SERVICE if config.local_compute_services else None)


def check(data: dict, where: str) -> dict:
    info = data.get("command_queue_info") if isinstance(data, dict) else None
    if not isinstance(info, dict) or not (isinstance(info.get("connection_url"), str)
                                          and isinstance(info.get("queue"), str)):
        raise RegistrationError(f"{where}: command_queue_info needs connection_url and queue")
    if "endpoint_id" not in data:
        raise RegistrationError(f"{where}: endpoint_id is missing")
    return data


def peek(config) -> str | None:
    """The endpoint id without asking the service (for a reload check)."""
    for path in (config.conf_dir / STATIC, config.conf_dir / ENDPOINT_FILE, config.conf_dir / "run" / ENDPOINT_FILE):
        try:
            return str(json.loads(path.read_text())["endpoint_id"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def obtain(config, log) -> dict:
    static = config.conf_dir / STATIC
    if static.exists():
        return check(json.loads(static.read_text()), str(static))
    url = service_url(config)
    if url is None:
        raise RegistrationError(f"{config.conf_dir / 'config.yaml'}: no service to register with: set "
                                f"compute_service_url (or local_compute_services: true), or provide {static}")
    if config.compute_service_token_file is None:
        raise RegistrationError(f"{config.conf_dir / 'config.yaml'}: compute_service_token_file is required to "
                                f"register with {url}")
    token = config.compute_service_token_file.read_text().strip()
    client = globus_sdk.ComputeClientV3(base_url=url, authorizer=globus_sdk.AccessTokenAuthorizer(token))
    data = {"endpoint_name": config.name, "display_name": config.display_name or config.name, "multi_user": True,
            "allowed_functions": list(config.allowed_functions) if config.allowed_functions else None,
            "high_assurance": config.high_assurance, "subscription_uuid": config.subscription_id,
            "authentication_policy": config.authentication_policy, "public": config.public,
            "admins": list(config.admins)}
    data = {k: v for k, v in data.items() if v is not None}
    saved = config.conf_dir / "run" / ENDPOINT_FILE
    endpoint_id = peek(config)
    try:
        response = (client.update_endpoint(endpoint_id, data) if endpoint_id else client.register_endpoint(data)).data
    except globus_sdk.GlobusAPIError as e:
        raise RegistrationError(f"{url} refused the registration: HTTP {e.http_status} {e.code}: {e.message}") from None
    except globus_sdk.NetworkError as e:
        raise RegistrationError(f"cannot reach {url}: {e}") from None
    check(response, url)
    if str(response["endpoint_id"]) != endpoint_id:
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(json.dumps({"endpoint_id": str(response["endpoint_id"])}))
        os.replace(tmp, saved)
    log.info("registered with the compute service", url=url, endpoint_id=str(response["endpoint_id"]),
             new=endpoint_id is None)
    return response
