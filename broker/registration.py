"""The MEP's endpoint id, command queue and heartbeat queue: from the web service at every
start, as upstream does, or from a fixed NAME/registration.json.

Registration goes through globus-sdk's ComputeClientV3 with upstream's body (the
metadata with the versions, the hostname, config.yaml and the template and schema) and
upstream's User-Agent (globus-compute-sdk-VERSION): POST /v3/endpoints the first time,
PUT /v3/endpoints/ID afterwards, so the id is stable and the AMQP credentials are fresh
at each start. A reply with another endpoint id than the one asked for is refused, as
upstream refuses it. The id is kept in NAME/run/endpoint.json, the one directory the
broker may write; a root-owned NAME/endpoint.json (upstream's file, kept by `mepctl
configure --from-upstream`) comes first, so a migrated endpoint keeps its id. The service is `compute_service_url`, else http://localhost:5000 with
upstream's `local_compute_services: true`, else the `environment`'s (production by
default). The credential: a GlobusApp (broker/globus_login.py), or a bearer token from
`compute_service_token_file` (root:broker, 0640; the demo and most tests).

`amqp_port` rewrites the port of the command queue's URL, as upstream does. A reload
re-executes the broker with the registration it has (broker/reexec.py): no Auth call.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import pwd
import socket
import urllib.parse

import globus_sdk
from globus_compute_common.sdk_version_sharing import user_agent_substring

from broker import globus_login, layout

STATIC, ENDPOINT_FILE = layout.STATIC_REGISTRATION, layout.ENDPOINT_FILE


class RegistrationError(Exception):
    pass


class Retryable(RegistrationError):
    """The service could not be reached or answered with an error: try again later."""


class CredentialRefused(Retryable):
    """Auth or the service refused the credential (or there is none): trying again helps
    only once the administrator has done what the message says."""


SDK_VERSION = importlib.metadata.version("globus-compute-sdk")  # the UEP's pinned version, and the protocol's
# globus_compute_sdk.sdk._environments.get_web_service_url (4.19), copied: importing the SDK
# starts a thread (its executor's atexit watcher) that would take a SIGHUP the main thread
# blocks across a re-exec (broker/reexec.py), losing that reload
SERVICE_URLS = {"production": "https://compute.api.globus.org", "preview": "https://compute.api.preview.globus.org",
                "dev": "https://api.dev.funcx.org", "local": "http://localhost:5000",
                **{e: f"https://compute.api.{e}.globuscs.info" for e in ("sandbox", "test", "integration", "staging")}}


def service_url(config) -> str:
    if config.compute_service_url:
        return config.compute_service_url
    env = "local" if config.local_compute_services else (config.environment or os.environ.get("GLOBUS_SDK_ENVIRONMENT")
                                                          or "production")
    return SERVICE_URLS.get(env, SERVICE_URLS["production"])


def check(data: dict, where: str, heartbeat: bool = False) -> dict:
    info = data.get("command_queue_info") if isinstance(data, dict) else None
    if not isinstance(info, dict) or not (isinstance(info.get("connection_url"), str)
                                          and isinstance(info.get("queue"), str)):
        raise RegistrationError(f"{where}: command_queue_info needs connection_url and queue")
    if "endpoint_id" not in data:
        raise RegistrationError(f"{where}: endpoint_id is missing")
    hb = data.get("heartbeat_queue_info")
    if (heartbeat or hb is not None) and not (isinstance(hb, dict) and isinstance(hb.get("connection_url"), str)
                                              and isinstance(hb.get("queue"), str)
                                              and isinstance(hb.get("queue_publish_kwargs"), dict)):
        raise RegistrationError(f"{where}: heartbeat_queue_info needs connection_url, queue and queue_publish_kwargs")
    return data


def update_url_port(url: str, port: int) -> str:
    """Upstream's rewrite (globus_compute_endpoint.endpoint.utils.update_url_port)."""
    parts = urllib.parse.urlparse(url)
    netloc = parts.netloc.replace(f":{parts.port}", f":{port}") if parts.port else f"{parts.netloc}:{port}"
    return urllib.parse.urlunparse(parts._replace(netloc=netloc))


def metadata(config) -> dict:
    """Upstream's (CoreEndpoint.get_metadata): what the web service shows an admin."""
    def text(path):
        try:
            return path.read_text()
        except OSError:
            return None
    try:
        schema = json.loads(config.user_config_schema_path.read_text())
    except (OSError, ValueError):
        schema = None
    template = text(config.user_config_template_path)
    if template is None and config.user_config_template_path.suffix == ".j2":
        template = text(config.user_config_template_path.with_suffix(""))
    return {"endpoint_version": SDK_VERSION, "python_version": platform.python_version(),
            "hostname": socket.getfqdn(), "local_user": pwd.getpwuid(os.getuid()).pw_name,
            "endpoint_config": text(layout.config_file(config.conf_dir)), "user_config_template": template,
            "user_config_schema": schema}


def body(config) -> dict:
    """As globus_compute_sdk.Client.register_endpoint builds it from upstream's arguments."""
    data = {"endpoint_name": config.name, "display_name": config.display_name, "multi_user": True,
            "metadata": metadata(config),
            "allowed_functions": list(config.allowed_functions) if config.allowed_functions else None,
            "authentication_policy": config.authentication_policy, "subscription_uuid": config.subscription_id,
            "public": config.public, "high_assurance": config.high_assurance,
            "admins": list(config.admins) or None}
    return {k: v for k, v in data.items() if v is not None}


def client(config, url: str) -> globus_sdk.ComputeClientV3:
    """The client, with a GlobusApp or a static token (compute_service_token_file)."""
    ua = user_agent_substring(SDK_VERSION)
    if config.compute_service_token_file is not None and globus_login.client_credentials(config) is None:
        token = config.compute_service_token_file.read_text().strip()
        return globus_sdk.ComputeClientV3(base_url=url, authorizer=globus_sdk.AccessTokenAuthorizer(token), app_name=ua)
    if globus_login.client_credentials(config) is None and not globus_login.has_login(config):
        raise CredentialRefused(
            f"no Globus credential to register with {url}: set {globus_login.ID_VAR} and {globus_login.SECRET_VAR} "
            f"(or client_credentials_file in {layout.config_file(config.conf_dir)}) for a client identity, or run "
            f"`mepctl login {config.name}` as root to log in as yourself (or set compute_service_token_file)")
    return globus_sdk.ComputeClientV3(base_url=url, app=globus_login.make_app(config), app_name=ua)


def peek(config) -> str | None:
    """The endpoint id without asking the service (for a reload check)."""
    for path in (layout.static_registration_file(config.conf_dir), layout.upstream_endpoint_file(config.conf_dir),
                 layout.saved_endpoint_file(config.conf_dir)):
        try:
            return str(json.loads(path.read_text())["endpoint_id"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def registered_high_assurance(saved) -> bool | None:
    """The high_assurance setting the endpoint was registered with (NAME/run/endpoint.json)."""
    try:
        value = json.loads(saved.read_text()).get("high_assurance")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None


def obtain(config, log) -> dict:
    static = layout.static_registration_file(config.conf_dir)
    if static.exists():
        return check(json.loads(static.read_text()), str(static))
    url = service_url(config)
    saved = layout.saved_endpoint_file(config.conf_dir)
    endpoint_id = peek(config)
    if (registered := registered_high_assurance(saved)) is not None and registered != config.high_assurance:
        raise RegistrationError(f"{layout.config_file(config.conf_dir)} says high_assurance: "
                                f"{str(config.high_assurance).lower()}, but this endpoint was registered with "
                                f"high_assurance: {str(registered).lower()} ({saved}); high assurance is fixed at "
                                "registration: put the setting back, or configure a new endpoint")
    data = body(config)
    try:
        compute = client(config, url)
        response = (compute.update_endpoint(endpoint_id, data) if endpoint_id else compute.register_endpoint(data)).data
    except globus_login.LoginError as e:
        raise CredentialRefused(str(e)) from None
    except globus_sdk.AuthAPIError as e:  # from the token endpoint: the credential itself
        raise CredentialRefused(globus_login.describe_refusal(config, e)) from None
    except globus_sdk.GlobusAPIError as e:
        msg = f"{url} refused the registration: HTTP {e.http_status} {e.code}: {e.message}"
        if e.http_status in (401, 403):
            if e.http_status == 401:
                globus_login.forget_client_tokens(config)  # the next attempt asks Auth afresh
            raise CredentialRefused(msg + ("; check compute_service_token_file" if config.compute_service_token_file
                                           else f"; run `mepctl login {config.name}` or check the client "
                                           "credentials")) from None
        raise (RegistrationError if e.http_status in (400, 404, 409, 422, 423) else Retryable)(msg) from None
    except globus_sdk.NetworkError as e:
        raise Retryable(f"cannot reach {url}: {e}") from None
    check(response, url, heartbeat=True)
    got = str(response["endpoint_id"])
    if endpoint_id and got != endpoint_id:
        raise RegistrationError(f"Unexpected response from server: mismatched endpoint id. Expected: {endpoint_id}, "
                                f"received: {got} ({url}; {saved} keeps the id this MEP registered with)")
    if got != endpoint_id or registered is None:  # the id, and the setting it was registered with
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(json.dumps({"endpoint_id": got, "high_assurance": config.high_assurance}))
        os.replace(tmp, saved)
    if config.amqp_port:
        info = response["command_queue_info"]
        info["connection_url"] = update_url_port(info["connection_url"], config.amqp_port)
    log.info("registered with the compute service", url=url, endpoint_id=got, new=endpoint_id is None,
             amqp_port=config.amqp_port)
    return response


def first_delay(failures: int) -> float:
    """Seconds before the next registration attempt after `failures` in a row: 5, 10, 20
    ... 300. An Auth refusal waits for the administrator, who must not be flooded with log
    lines, nor wait long once the credential is fixed."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** max(0, failures - 1))


RETRY_FIRST_S, RETRY_MAX_S = 5.0, 300.0


async def obtain_retrying(config, log, stopping=None) -> dict | None:
    """obtain(), again with backoff while the service is unreachable or refuses the
    credential (each time with the error and what to do: no tight restart loop); None if
    `stopping` (an asyncio.Event) is set meanwhile. A broken configuration or a mismatched
    endpoint id raises at once."""
    import asyncio
    failures = 0
    while True:
        try:
            return await _in_a_quiet_thread(obtain, config, log)
        except Retryable as e:
            failures += 1
            delay = first_delay(failures)
            log.error("cannot register with the compute service; trying again", error=str(e), failures=failures,
                      retry_in_s=delay)
        if stopping is None:
            await asyncio.sleep(delay)
        else:
            try:
                await asyncio.wait_for(stopping.wait(), delay)
                return None
            except asyncio.TimeoutError:
                pass


async def _in_a_quiet_thread(fn, *args):
    """globus-sdk is synchronous; run it in a thread of its own that blocks every signal
    and is gone afterwards. A thread left with SIGHUP unblocked would take a SIGHUP that
    arrives while the main thread blocks it across a re-exec (broker/reexec.py), and
    that reload would be lost."""
    import asyncio
    import concurrent.futures
    import signal
    pool = concurrent.futures.ThreadPoolExecutor(
        1, "registration", initializer=signal.pthread_sigmask, initargs=(signal.SIG_BLOCK, signal.valid_signals()))
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=True)


def amqp_credentials_refused(exc) -> bool:
    """Whether an AMQP connection failure is RabbitMQ refusing the account (revoked or
    rotated credentials): re-registering gives fresh ones, retrying the URL never will."""
    import aiormq.exceptions
    return isinstance(exc, aiormq.exceptions.ProbableAuthenticationError) or "ACCESS_REFUSED" in str(exc)
