"""What the Globus Compute web service does for a multi-user endpoint, in small:
registration, functions, task submission, UEP ids and start commands, results.

A submission to a MEP picks the user endpoint by a stable id derived from (MEP id,
user's identity id, user_endpoint_config, user_runtime): the same user with the same
config reuses one UEP, another user never shares it. The tasks go to that UEP's own
queue; a start-UEP command, carrying that UEP's own RabbitMQ credentials, goes to the
MEP (a MEP that already runs the UEP only refreshes its credentials). Results come back
on the UEP's own result queue, are checked against the task's UEP, and are forwarded to
the submitting user's task-group queue, which only that user's account can read.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import time
import uuid

import aio_pika
import attrs
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import EPStatusReport, Result, ResultErrorDetails, Task

from localservice.rabbit import Rabbit

log = logging.getLogger("localservice")
TASK_GROUP_EXPIRES_MS = 24 * 3600 * 1000


class ServiceError(Exception):
    """An HTTP error in the service's JSON shape: status, code, message; `extra` are more
    fields of the body (a policy refusal's authorization_parameters)."""

    def __init__(self, status: int, code: str, message: str, extra: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra or {}


HA_WARNING = ("It is your responsibility to ensure disclosure of regulated data, such as Protected Health "
              "Information, resulting from the submission of this function and its arguments is legally authorized.")


def policy_refusal(refusal) -> ServiceError:
    """A Globus Auth requirements error (GARE), the shape in which Globus services say
    "this session does not satisfy the policy": a 403 whose authorization_parameters
    name the policy, so that the SDK (globus_sdk.gare.to_gares; its Client with a
    GlobusApp) starts the login that would satisfy it; the message says which
    constraint failed."""
    message = refusal.message()
    return ServiceError(403, "AuthorizationRequired", message, extra={
        "authorization_parameters": {"session_message": message,
                                     "session_required_policies": [refusal.policy["id"]]},
        "reason": message})


@attrs.define
class Endpoint:
    id: str
    name: str
    owner: str  # identity id of the registering admin
    multi_user: bool
    allowed_functions: list | None = None
    display_name: str | None = None
    authentication_policy: str | None = None
    high_assurance: bool = False
    subscription_id: str | None = None


@attrs.define
class UserEndpoint:
    id: str
    mep: str
    identity: str
    username: str
    amqp_creds: dict
    pending: set = attrs.field(factory=set)  # task ids not yet answered


@attrs.define
class TaskRecord:
    id: str
    identity: str
    uep: str
    task_group: str
    function: str
    status: str = "waiting-for-ep"
    result: bytes | None = None
    high_assurance: bool = False  # an HA function's: the result is fetched, never pushed


def uep_id(mep_id: str, identity_id: str, config: dict, runtime: dict) -> str:
    """Stable for the same user, config and runtime; never the same for two users."""
    doc = json.dumps({"identity": identity_id, "config": config, "runtime": runtime}, sort_keys=True,
                     separators=(",", ":"), default=str)
    return str(uuid.uuid5(uuid.UUID(mep_id), doc))


def user_tag(identity_id: str) -> str:
    return hashlib.sha256(identity_id.encode()).hexdigest()[:16]


def task_buffer(function_code: str, payload: str) -> str:
    """The SDK registers the function as one packed buffer and sends args and kwargs as
    two more; the UEP unpacks the three in a row."""
    return function_code + payload


class ComputeService:
    def __init__(self, rabbit: Rabbit, state_path=None):
        self.rabbit, self.state_path = rabbit, state_path
        self.endpoints: dict[str, Endpoint] = {}
        self.functions: dict[str, dict] = {}
        self.ueps: dict[str, UserEndpoint] = {}
        self.tasks: dict[str, TaskRecord] = {}
        self.result_urls: dict[str, str] = {}  # identity id -> amqp URL of the user's result account
        self.heartbeats: dict[str, list] = {}  # MEP id -> [(time received, EPStatusReport global_state), ...]
        self.registrations: list[dict] = []  # every registration body as received (GET /v3/endpoints/ID/registrations)
        self._consuming: set[str] = set()  # MEP ids whose heartbeat queue is consumed
        self.policies = None  # localservice.policies.Policies: Globus Auth's, which it asks (make_app sets it)
        self._load()

    # -- persistence: only the endpoints, so that a MEP keeps its id across restarts --

    def _load(self) -> None:
        if self.state_path is not None and self.state_path.exists():
            for record in json.loads(self.state_path.read_text()).get("endpoints", []):
                self.endpoints[record["id"]] = Endpoint(**record)

    def _save(self) -> None:
        if self.state_path is not None:
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"endpoints": [attrs.asdict(e) for e in self.endpoints.values()]}, indent=1))
            tmp.replace(self.state_path)

    # -- endpoints ---------------------------------------------------------------------

    async def register_endpoint(self, identity: dict, data: dict, endpoint_id: str | None = None,
                                user_agent: str = "") -> dict:
        if not isinstance(data.get("endpoint_name"), str):
            raise ServiceError(422, "UNPROCESSABLE_ENTITY", "endpoint_name is required")
        if endpoint_id is None:
            endpoint_id = str(uuid.uuid4())
        elif endpoint_id in self.endpoints and self.endpoints[endpoint_id].owner != identity["id"]:
            raise ServiceError(403, "FORBIDDEN", f"Endpoint {endpoint_id} belongs to another identity")
        allowed = data.get("allowed_functions")
        self.endpoints[endpoint_id] = Endpoint(id=endpoint_id, name=data["endpoint_name"], owner=identity["id"],
                                               multi_user=bool(data.get("multi_user")),
                                               allowed_functions=[str(f) for f in allowed] if allowed else None,
                                               display_name=data.get("display_name"),
                                               authentication_policy=_opt_str(data.get("authentication_policy")),
                                               high_assurance=data.get("high_assurance") is True,
                                               subscription_id=_opt_str(data.get("subscription_uuid")))
        self._save()
        queue, heartbeats = f"mep.{endpoint_id}.command", f"mep.{endpoint_id}.heartbeats"
        await self.rabbit.queue(queue)
        # the real service's shape: heartbeats go to a named direct exchange (RabbitMQ refuses
        # publishing to the default exchange there); the account may write only that one
        heartbeat_q = await self.rabbit.exchange_to_queue(heartbeats, "heartbeats")
        url = await self.rabbit.account(f"mep-{endpoint_id}", read=(queue,), write=(heartbeats,))
        if endpoint_id not in self._consuming:
            self._consuming.add(endpoint_id)
            await heartbeat_q.consume(lambda m: self._on_mep_heartbeat(endpoint_id, m))
        log.info("endpoint %s registered (%s, multi_user=%s, version %s, from %s)", endpoint_id, data["endpoint_name"],
                 data.get("multi_user"), (data.get("metadata") or {}).get("endpoint_version"), user_agent)
        self.registrations.append({"endpoint_id": endpoint_id, "body": data, "user_agent": user_agent,
                                   "identity": identity["id"]})
        return {"endpoint_id": endpoint_id, "command_queue_info": {"connection_url": url, "queue": queue},
                "heartbeat_queue_info": {"connection_url": url, "exchange": heartbeats, "queue": heartbeats,
                                         "queue_publish_kwargs": {"exchange": heartbeats, "routing_key": "heartbeats",
                                                                  "mandatory": True,
                                                                  "properties": {"delivery_mode": 2}}}}

    async def _on_mep_heartbeat(self, endpoint_id: str, message) -> None:
        async with message.process():
            try:
                report = messagepack.unpack(message.body)
            except Exception as e:  # noqa: BLE001
                log.warning("MEP %s sent an unreadable heartbeat: (%s) %s", endpoint_id, type(e).__name__, e)
                return
            if not isinstance(report, EPStatusReport) or str(report.endpoint_id) != endpoint_id:
                log.warning("MEP %s sent a heartbeat that is not its own EPStatusReport; dropped", endpoint_id)
                return
            self.heartbeats.setdefault(endpoint_id, []).append((time.time(), dict(report.global_state)))
            del self.heartbeats[endpoint_id][:-100]

    def endpoint_status(self, endpoint_id: str) -> dict:
        """online while heartbeats come within three periods; a period of 0 is the MEP's
        last word (it stopped)."""
        mep = self.endpoint(endpoint_id)
        seen = self.heartbeats.get(mep.id, [])
        status = "offline"
        if seen:
            at, state = seen[-1]
            period = state.get("heartbeat_period") or 0
            status = "online" if period and time.time() - at < 3 * period else "offline"
        return {"status": status, "details": {"display_name": mep.display_name},
                "heartbeats": [{"received": at, "global_state": st} for at, st in seen]}

    def endpoint(self, endpoint_id: str) -> Endpoint:
        try:
            return self.endpoints[str(uuid.UUID(endpoint_id))]
        except (KeyError, ValueError):
            raise ServiceError(404, "NOT_FOUND", f"Endpoint {endpoint_id} not found") from None

    # -- functions ---------------------------------------------------------------------

    def register_function(self, identity: dict, data: dict) -> dict:
        if not isinstance(data.get("function_code"), str):
            raise ServiceError(422, "UNPROCESSABLE_ENTITY", "function_code is required")
        ha_endpoint = None
        if data.get("ha_endpoint_id"):
            ha_endpoint = self.endpoint(str(data["ha_endpoint_id"]))
            if not ha_endpoint.high_assurance:
                raise ServiceError(400, "BAD_REQUEST", f"Endpoint {ha_endpoint.id} is not a high-assurance endpoint; "
                                   "ha_endpoint_id must name one")
        function_id = str(uuid.uuid4())
        self.functions[function_id] = {"code": data["function_code"], "name": data.get("function_name"),
                                       "owner": identity["id"], "ha_endpoint": ha_endpoint and ha_endpoint.id}
        if ha_endpoint:
            log.info("function %s registered as high-assurance for endpoint %s", function_id, ha_endpoint.id)
            return {"function_uuid": function_id, "ha_warning": HA_WARNING}
        return {"function_uuid": function_id}

    def check_policy(self, mep: Endpoint, identity_set: list, authenticated_at: dict | None) -> None:
        """Globus Auth's evaluation of the endpoint's authentication policy, as the real
        service asks for it at every submission and HA result retrieval."""
        if mep.authentication_policy is None or self.policies is None:
            return
        try:
            refusal = self.policies.evaluate(mep.authentication_policy, identity_set, authenticated_at)
        except Exception as e:  # noqa: BLE001 - an unknown policy id: Auth's 404
            raise ServiceError(403, "FORBIDDEN", f"Endpoint {mep.id} names the authentication policy "
                               f"{mep.authentication_policy}, which Globus Auth does not know ({e})") from None
        if refusal is not None:
            log.info("policy %s refuses %s: %s", refusal.policy["id"], identity_set[0].get("username"),
                     "; ".join(refusal.reasons))
            raise policy_refusal(refusal)

    # -- submission --------------------------------------------------------------------

    async def submit(self, identity_set: list, endpoint_id: str, data: dict, authenticated_at: dict | None = None) -> dict:
        mep = self.endpoint(endpoint_id)
        self.check_policy(mep, identity_set, authenticated_at)
        identity = identity_set[0]
        tasks = data.get("tasks")
        if not isinstance(tasks, dict) or not tasks:
            raise ServiceError(422, "UNPROCESSABLE_ENTITY", "tasks must map function ids to lists of payloads")
        for function_id in tasks:
            if function_id not in self.functions:
                raise ServiceError(404, "FUNCTION_NOT_FOUND", f"Function {function_id} not found")
            if mep.allowed_functions is not None and function_id not in mep.allowed_functions:
                raise ServiceError(403, "FUNCTION_NOT_PERMITTED",
                                   f"Function {function_id} not permitted on endpoint {mep.id}")
            ha_endpoint = self.functions[function_id].get("ha_endpoint")
            if ha_endpoint is not None and ha_endpoint != mep.id:
                raise ServiceError(403, "FUNCTION_NOT_PERMITTED",
                                   f"Function {function_id} is a high-assurance function of endpoint {ha_endpoint}; "
                                   f"it may not run on endpoint {mep.id}")
        if not mep.multi_user:
            raise ServiceError(422, "UNPROCESSABLE_ENTITY", "this local service serves multi-user endpoints only")
        config, runtime = data.get("user_endpoint_config") or {}, data.get("user_runtime") or {}
        uep = await self._user_endpoint(mep, identity, config, runtime)
        group = str(data.get("task_group_id") or uuid.uuid4())
        await self.rabbit.queue(f"tg.{user_tag(identity['id'])}.{group}", expires_ms=TASK_GROUP_EXPIRES_MS)
        headers = {"resource_specification": json.dumps(data.get("resource_specification")),
                   "result_serializers": data.get("result_serializers") or []}
        out: dict[str, list] = {}
        for function_id, payloads in tasks.items():
            for payload in payloads:
                task_id = str(uuid.uuid4())
                ha = self.functions[function_id].get("ha_endpoint") is not None
                self.tasks[task_id] = TaskRecord(task_id, identity["id"], uep.id, group, function_id, high_assurance=ha)
                uep.pending.add(task_id)
                body = messagepack.pack(Task(task_id=uuid.UUID(task_id),
                                             task_buffer=task_buffer(self.functions[function_id]["code"], payload)))
                await self.rabbit.publish(f"uep.{uep.id}.tasks", body,
                                          headers={"function_uuid": function_id, "task_uuid": task_id, **headers})
                out.setdefault(function_id, []).append(task_id)
        await self._send_start(mep, uep, identity_set, config, runtime)
        log.info("%d task(s) from %s for MEP %s -> UEP %s", sum(map(len, out.values())), identity.get("username"),
                 mep.id, uep.id)
        reply = {"request_id": str(uuid.uuid4()), "task_group_id": group, "endpoint_id": mep.id, "tasks": out}
        if any(self.functions[f].get("ha_endpoint") for f in out):
            reply["ha_warning"] = HA_WARNING
        return reply

    async def _user_endpoint(self, mep: Endpoint, identity: dict, config: dict, runtime: dict) -> UserEndpoint:
        """The UEP for this user and config, with a fresh password at every submission:
        the start command carries it, and the MEP hands it to a running UEP through its
        credential memfd, which the UEP reads when it next connects."""
        uid = uep_id(mep.id, identity["id"], config, runtime)
        tasks_q, results, heartbeats = f"uep.{uid}.tasks", f"uep.{uid}.results", f"uep.{uid}.heartbeats"
        url = await self.rabbit.account(f"uep-{uid}", read=(tasks_q,), write=(results, heartbeats))
        if uid in self.ueps:
            uep = self.ueps[uid]
            for info in ("task_queue_info", "result_queue_info", "heartbeat_queue_info"):
                uep.amqp_creds[info]["connection_url"] = url
            return uep
        await self.rabbit.queue(tasks_q)
        result_q = await self.rabbit.exchange_to_queue(results, "results")
        heartbeat_q = await self.rabbit.exchange_to_queue(heartbeats, "heartbeats")

        def publish_info(name: str, key: str) -> dict:
            return {"connection_url": url, "exchange": name, "queue": name,
                    "queue_publish_kwargs": {"exchange": name, "routing_key": key, "mandatory": True,
                                             "properties": {"delivery_mode": 2}}}
        creds = {"endpoint_id": uid, "task_queue_info": {"connection_url": url, "queue": tasks_q},
                 "result_queue_info": publish_info(results, "results"),
                 "heartbeat_queue_info": publish_info(heartbeats, "heartbeats")}
        uep = self.ueps[uid] = UserEndpoint(uid, mep.id, identity["id"], identity.get("username", ""), creds)
        await result_q.consume(lambda m: self._on_result(uep, m))
        await heartbeat_q.consume(lambda m: self._on_heartbeat(uep, m))
        return uep

    async def _send_start(self, mep: Endpoint, uep: UserEndpoint, identity_set, config, runtime) -> None:
        identity = identity_set[0]
        body = {"command": "cmd_start_endpoint", "args": [],
                "kwargs": {"name": uep.id, "amqp_creds": uep.amqp_creds, "user_opts": config, "user_runtime": runtime},
                "globus_effective_identity": identity["id"], "globus_identity_set": identity_set,
                "globus_username": identity.get("username", "")}
        await self.rabbit.publish(f"mep.{mep.id}.command", json.dumps(body).encode(), content_type="application/json",
                                  timestamp=datetime.datetime.now(datetime.timezone.utc))

    # -- results and notices -----------------------------------------------------------

    async def _on_result(self, uep: UserEndpoint, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            try:
                result = messagepack.unpack(message.body)
            except Exception as e:  # noqa: BLE001
                log.warning("UEP %s sent an unreadable result: (%s) %s", uep.id, type(e).__name__, e)
                return
            if not isinstance(result, Result):
                return
            task = self.tasks.get(str(result.task_id))
            if task is None or task.uep != uep.id:
                log.warning("UEP %s sent a result for task %s, which is not its own; dropped", uep.id, result.task_id)
                return
            await self._deliver(task, message.body, failed=result.is_error)

    async def _on_heartbeat(self, uep: UserEndpoint, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            try:
                report = messagepack.unpack(message.body)
            except Exception:  # noqa: BLE001
                return
            if not isinstance(report, EPStatusReport) or not report.global_state.get("error"):
                return
            error = str(report.global_state["error"])
            log.warning("UEP %s did not start: %s", uep.id, error)
            await (await self.rabbit.queue(f"uep.{uep.id}.tasks")).purge()  # failed tasks must not run later
            for task_id in list(uep.pending):
                failure = Result(task_id=uuid.UUID(task_id), data=error,
                                 error_details=ResultErrorDetails(code="ENDPOINT_START_FAILED", user_message=error))
                await self._deliver(self.tasks[task_id], messagepack.pack(failure), failed=True)

    async def _deliver(self, task: TaskRecord, body: bytes, failed: bool) -> None:
        if task.result is not None:
            return  # already answered (a failure notice came first)
        task.status, task.result = ("failed" if failed else "success"), body
        self.ueps[task.uep].pending.discard(task.id)
        headers = None
        if task.high_assurance:  # the seed: only a notice; the Executor fetches the result through the API
            body = messagepack.pack(Result(task_id=uuid.UUID(task.id), data=""))
            headers = {"high_assurance": True}
        await self.rabbit.publish(f"tg.{user_tag(task.identity)}.{task.task_group}", body, headers=headers,
                                  timestamp=datetime.datetime.now(datetime.timezone.utc))

    async def result_connection(self, identity: dict) -> dict:
        tag = user_tag(identity["id"])
        if identity["id"] not in self.result_urls:
            self.result_urls[identity["id"]] = await self.rabbit.account(  # this user's task groups only
                f"user-{tag}", read_pattern=f"^tg\\.{tag}\\.[0-9a-f-]+$")
        return {"connection_url": self.result_urls[identity["id"]], "queue_prefix": f"tg.{tag}."}

    def task_status(self, identity_set: list, task_id: str, authenticated_at: dict | None = None) -> dict:
        """A task's state and result; an HA task's result only while the caller still
        satisfies its endpoint's policy (the seed: verified at the time of retrieval)."""
        identity = identity_set[0]
        task = self.tasks.get(task_id)
        if task is None or task.identity != identity["id"]:
            raise ServiceError(404, "TASK_NOT_FOUND", f"Task {task_id} not found")
        if task.high_assurance:
            self.check_policy(self.endpoints[self.ueps[task.uep].mep], identity_set, authenticated_at)
            if task.result is not None:
                log.info("HA task %s: result retrieved through the API by %s (policy checked)", task.id,
                         identity.get("username"))
        doc = {"task_id": task.id, "status": task.status, "completion_t": None}
        if task.result is not None:
            result = messagepack.unpack(task.result)
            doc["completion_t"] = str(datetime.datetime.now().timestamp())
            doc["exception" if result.is_error else "result"] = result.data
        return doc


def _opt_str(value) -> str | None:
    return str(value) if value else None
