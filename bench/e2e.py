"""End to end: the real SDK submitting to the MEP through the local compute service, with
the real globus-compute-endpoint as the UEP. Cold (each submission needs a new UEP: a
new user_endpoint_config value gives a new UEP id) and warm (the UEP is running), tasks/s
through one warm UEP, and how a cold start divides between the MEP (submit -> UEP exec'd,
from the broker's log) and the UEP's own start-up (exec'd -> result).
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import subprocess
import sys
import time
import uuid

from bench import fixture
from bench.mep import MEP, identity

UEP_PROGRAM = "/opt/mep/uep-venv/bin/mep-uep-start"
SERVICE_URL = "http://127.0.0.1:5000"
TEMPLATE = """engine:
  type: ThreadPoolEngine
  max_workers: 4
# tag: {{ tag | default(0) }}
"""
SDK_SCRIPT = """
import json, os, sys, time
import globus_sdk
from globus_compute_sdk import Client, Executor
cold, warm, rate = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
client = Client(local_compute_services=True, authorizer=globus_sdk.AccessTokenAuthorizer(os.environ["GC_TOKEN"]))
def noop(x):
    return x
fid = client.register_function(noop)
out = {"cold": [], "warm": []}
def once(config):
    # a fresh Executor per sample: the SDK rate-limits each one after 4 submissions in 16 s
    with Executor(endpoint_id=sys.argv[1], client=client, user_endpoint_config=config) as ex:
        t0 = time.time()
        ex.submit_to_registered_function(fid, args=(1,)).result(timeout=120)
        return [t0, time.time()]
for i in range(cold):
    out["cold"].append(once({"tag": i + 1}))
for i in range(warm):
    out["warm"].append(once({"tag": cold}))
# throughput: one Executor with the SDK's largest burst allowance (8 submissions per second)
with Executor(endpoint_id=sys.argv[1], client=client, user_endpoint_config={"tag": cold}, api_burst_limit=8,
              api_burst_window_s=1) as ex:
    t0 = time.time()
    futures = [ex.submit_to_registered_function(fid, args=(i,)) for i in range(rate)]
    for f in futures:
        f.result(timeout=300)
    out["tasks_per_s"] = rate / (time.time() - t0)
print(json.dumps(out))
"""


class Service:
    """The local compute service on port 5000, in DIR (a directory of its own), with a
    static bearer token for each of `users` (as USER@bench.example) and for the MEP's
    administrator, and, for each of `clients`, a Globus Auth confidential client
    (client_credentials[name] = (id, secret)); `admin_token` is a file the broker account
    reads."""

    def __init__(self, fx: fixture.Fixture, d, users, clients=()):
        self.dir = d
        self.dir.mkdir(mode=0o755)
        self.tokens = {u: secrets.token_hex(16) for u in (*users, "admin")}
        self.client_credentials = {c: (str(uuid.uuid4()), secrets.token_urlsafe(24)) for c in clients}
        (d / "identities.json").write_text(json.dumps({
            "tokens": {t: [identity(f"{u}@bench.example")] for u, t in self.tokens.items()},
            "clients": {i: {"secret": s} for i, s in self.client_credentials.values()}}))
        self.log = open(d / "service.log", "w")
        self.proc = subprocess.Popen([f"{sys.prefix}/bin/python3", "-I", "-m", "localservice", "--identities",
                                      str(d / "identities.json"), "--purge-on-exit"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.admin_token = d / "token"
        self.admin_token.write_text(self.tokens["admin"])
        os.chown(self.admin_token, 0, fx.broker.pw_gid)
        os.chmod(self.admin_token, 0o640)
        deadline = time.monotonic() + 30
        while "local compute service on" not in (d / "service.log").read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the local service did not start:\n{(d / 'service.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def measure(fx: fixture.Fixture, cold: int, warm: int, rate: int, say=print) -> dict:
    user = f"{fixture.PREFIX}e2e"
    fixture.run("useradd", "--create-home", "--shell", "/bin/bash", user)
    python = f"{sys.prefix}/bin/python3"
    d = fx.dir / "e2e"
    service = Service(fx, d, [user])
    mep = None
    try:
        mep = MEP(fx, config={"compute_service_url": SERVICE_URL, "compute_service_token_file": str(service.admin_token),
                              "mu_child_ep_grace_period_s": 5},
                  template=TEMPLATE, schema={}, uep_argv=[UEP_PROGRAM, "_start-user-endpoint"], registration=False)
        endpoint_id = mep.endpoint_id
        say(f"end to end: {cold} cold and {warm} warm submissions, then {rate} tasks through one UEP")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(d), "GC_TOKEN": service.tokens[user]}
        out = subprocess.run([python, "-c", SDK_SCRIPT, endpoint_id, str(cold), str(warm), str(rate)],
                             capture_output=True, text=True, env=env, timeout=600)
        if out.returncode:
            raise RuntimeError(f"the SDK script failed:\n{out.stderr[-3000:]}")
        data = json.loads(out.stdout.splitlines()[-1])
        started = [datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
                   for line in mep.output().splitlines() if "user endpoint started" in line]
        shares = [{"mep_s": s - t0, "uep_s": t1 - s} for (t0, t1), s in zip(data["cold"], started)]
        return {"cold_ns": [int((b - a) * 1e9) for a, b in data["cold"]],
                "warm_ns": [int((b - a) * 1e9) for a, b in data["warm"]],
                "tasks_per_s": data["tasks_per_s"], "cold_start_split": shares}
    finally:
        if mep is not None:
            mep.stop()
        service.stop()
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
        subprocess.run(["userdel", "--force", "--remove", user], capture_output=True)
