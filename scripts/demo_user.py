"""The demo's user side: what a scientist runs on a laptop, with the unmodified
globus-compute-sdk, against the local compute service (Client(local_compute_services=True)).

    demo_user.py register                 -> prints the ids of the demo's functions (JSON)
    demo_user.py run ENDPOINT_ID FUNCS MAX_WORKERS
    demo_user.py refused ENDPOINT_ID FUNCS
    demo_user.py unmapped ENDPOINT_ID FUNCS
    demo_user.py policy ENDPOINT_ID FUNCS   -> the service's refusal by the endpoint's authentication policy
The bearer token (standing in for the user's Globus login) comes from $GC_TOKEN.
"""

import json
import os
import sys

import globus_sdk
from globus_compute_sdk import Client, Executor


def whoami():
    import os
    import pwd
    return {"user": pwd.getpwuid(os.getuid()).pw_name, "uid": os.getuid(), "pid": os.getpid()}


def busy_thread(seconds):
    """Which worker ran it: a process of the UEP's worker pool (and its thread)."""
    import os
    import threading
    import time
    time.sleep(seconds)
    return f"{os.getpid()}/{threading.current_thread().name}"


def not_on_the_allow_list():
    return "this should never run"


def client() -> Client:
    return Client(local_compute_services=True, authorizer=globus_sdk.AccessTokenAuthorizer(os.environ["GC_TOKEN"]))


def main(argv) -> int:
    c = client()
    if argv[0] == "register":
        print(json.dumps({f.__name__: c.register_function(f) for f in (whoami, busy_thread, not_on_the_allow_list)}))
        return 0
    endpoint_id, funcs = argv[1], json.loads(argv[2])
    with Executor(endpoint_id=endpoint_id, client=c) as ex:
        if argv[0] == "refused":
            try:
                ex.submit_to_registered_function(funcs["not_on_the_allow_list"]).result(timeout=60)
                print("    UNEXPECTED: the function ran")
                return 1
            except Exception as e:  # noqa: BLE001 - the point is to show the message
                print(f"    refused: {str(e).strip().splitlines()[-1].strip()[:300]}")
                return 0
        workers = int(argv[3])
        ex.user_endpoint_config = {"max_workers": workers}
        me = ex.submit_to_registered_function(funcs["whoami"]).result(timeout=120)
        print(f"    ran as POSIX user {me['user']} (uid {me['uid']}) in worker process {me['pid']} of its user endpoint")
        threads = [ex.submit_to_registered_function(funcs["busy_thread"], args=(2.0,)) for _ in range(workers * 2)]
        used = len({f.result(timeout=120) for f in threads})
        print(f"    user_endpoint_config max_workers={workers}: {workers * 2} tasks ran on {used} workers")
    return 0


def refused_identity(endpoint_id: str, funcs: dict) -> int:
    with Executor(endpoint_id=endpoint_id, client=client()) as ex:
        try:
            ex.submit_to_registered_function(funcs["whoami"]).result(timeout=60)
            print("    UNEXPECTED: an unmapped identity ran a function")
            return 1
        except Exception as e:  # noqa: BLE001
            print(f"    refused: {str(e).strip()[:300]}")
            return 0


def refused_by_policy(endpoint_id: str, funcs: dict) -> int:
    """The service's answer is a Globus Auth requirements error (HTTP 403): with a
    GlobusApp the SDK would start the login the policy asks for; with a bare token it
    raises, and the message says which constraint failed."""
    with Executor(endpoint_id=endpoint_id, client=client()) as ex:
        try:
            ex.submit_to_registered_function(funcs["whoami"]).result(timeout=60)
            print("    UNEXPECTED: the policy let this identity run a function")
            return 1
        except globus_sdk.GlobusAPIError as e:
            print(f"    refused (HTTP {e.http_status} {e.code}): {e.message[:300]}")
            return 0


if __name__ == "__main__":
    if sys.argv[1] == "policy":
        sys.exit(refused_by_policy(sys.argv[2], json.loads(sys.argv[3])))
    if sys.argv[1] == "unmapped":
        sys.exit(refused_identity(sys.argv[2], json.loads(sys.argv[3])))
    sys.exit(main(sys.argv[1:]))
