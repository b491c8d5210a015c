"""Our MEP and upstream's (bench/upstream.py), side by side in one interleaved run, against
the local compute service, driven by the real SDK as the bench users (mepb-NN, each given
a home for its real UEPs):

- cold start: one user's submission that needs a new UEP -> its result; and the MEP's own
  share of it: the SDK's submit request answered (the service has published the start
  command by then) -> the UEP program's exec (the probe in front of it reports the time);
- a burst of N users at once (20, 50): the first submission -> every result, and -> every
  UEP exec'd;
- root PSS and whole-MEP PSS (root plus our unprivileged broker; upstream's MEP is all root)
  idle, with 20 real UEPs (after the 20-user burst), and with 20 and 200 probe UEPs that
  stay alive (start commands published straight to each MEP's command queue, in the
  service's own format);
- hangs (submissions without a result, starts without an exec, in the time allowed) and
  orphans (processes of a MEP's tree still there 15 s after it was stopped).

Every repetition runs ours and upstream's in turn, the order alternating; medians are the
figures, ours / upstream's the ratios. Real UEPs are ended (SIGTERM to the user's
processes) after each measurement, so that the next starts from the same state.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time

from bench import fixture, mep as bench_mep
from bench.e2e import SERVICE_URL, UEP_PROGRAM, Service
from bench.sessions import rollup
from bench.upstream import UEP_VENV, Upstream
from localservice.service import uep_id

TEMPLATE = """engine:
  type: ThreadPoolEngine
  max_workers: 2
heartbeat_period: 2
# tag: {{ tag | default(0) }}
"""
SCHEMA = {"type": "object"}
DRIVER = """
import json, os, sys, time, uuid
import globus_sdk
from globus_compute_sdk import Client, Executor
tokens, clients, fids, answered = json.loads(os.environ["GC_TOKENS"]), {}, {}, []
def noop(x):
    return x
def client(user):
    # the SDK's own submit call, timed when the service has answered it
    if user not in clients:
        c = clients[user] = Client(local_compute_services=True,
                                   authorizer=globus_sdk.AccessTokenAuthorizer(tokens[user]))
        v3, real = c._compute_web_client.v3, c._compute_web_client.v3.submit
        def submit(endpoint_id, data, real=real):
            r = real(endpoint_id, data)
            answered.append({"user": user, "t_ns": time.monotonic_ns(), "config": data.get("user_endpoint_config"),
                             "runtime": data.get("user_runtime")})
            return r
        v3.submit = submit
        fids[user] = c.register_function(noop)
    return clients[user]
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    # a task group of each Executor's own: else all share the first one's (the SDK's class-wide
    # default), whose result watcher is the first user's and never sees the others' results
    executors = {u: Executor(endpoint_id=req["endpoint"], client=client(u), user_endpoint_config={"tag": req["tag"]},
                             task_group_id=str(uuid.uuid4())) for u in req["users"]}
    answered.clear()
    done, errors = {}, {}
    t0 = time.monotonic_ns()
    futures = {u: ex.submit_to_registered_function(fids[u], args=(1,)) for u, ex in executors.items()}
    for u, f in futures.items():
        f.add_done_callback(lambda f, u=u: done.setdefault(u, time.monotonic_ns()))
    deadline = time.monotonic() + req["timeout"]
    for u, f in futures.items():
        try:
            f.result(timeout=max(0.1, deadline - time.monotonic()))
        except Exception as e:
            errors[u] = repr(e)[:300]
    for ex in executors.values():
        ex.shutdown(wait=False, cancel_futures=True)
    print(json.dumps({"t0_ns": t0, "done_ns": done, "errors": errors, "answered": list(answered)}), flush=True)
os._exit(0)  # the SDK's result watchers are threads that outlive their Executors
"""


class Driver:
    """One SDK process for the whole run (its imports paid once), one Client a user; each
    request is one submission by each of `users`, each through a new Executor."""

    def __init__(self, service: Service, home):
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "GC_TOKENS": json.dumps(service.tokens)}
        self.log = open(home / "sdk.log", "w")
        self.proc = subprocess.Popen([f"{sys.prefix}/bin/python3", "-c", DRIVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the SDK driver ended; see {self.log.name}")
        return json.loads(line)

    def submit(self, endpoint_id: str, users: list, timeout: float) -> dict:
        self.proc.stdin.write(json.dumps({"endpoint": endpoint_id, "users": users, "tag": secrets.token_hex(4),
                                          "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def homes(accounts) -> None:
    """A home for each bench user: upstream's child and our launcher put a UEP's directory
    and log in ~/.globus_compute (the fixture's userdel --remove takes it away)."""
    for a in accounts:
        os.makedirs(a.pw_dir, mode=0o700, exist_ok=True)
        os.chown(a.pw_dir, a.pw_uid, a.pw_gid)


def end_ueps(users: list, timeout: float = 30) -> None:
    """SIGTERM to every process of `users` (their UEPs), SIGKILL after `timeout`."""
    for u in users:
        subprocess.run(["pkill", "-TERM", "-u", u], capture_output=True)
    deadline = time.monotonic() + timeout
    while any(subprocess.run(["pgrep", "-u", u], capture_output=True).returncode == 0 for u in users):
        if time.monotonic() > deadline:
            for u in users:
                subprocess.run(["pkill", "-KILL", "-u", u], capture_output=True)
        time.sleep(0.2)


def tree(pid: int) -> dict:
    """pid -> (uid, start time) for `pid` and every descendant (all threads' children)."""
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                start = f.read().rsplit(")", 1)[1].split()[19]
            uid = os.stat(f"/proc/{p}").st_uid
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
        out[p] = (uid, start)
    return out


def pss(pid: int, broker_uid: int | None) -> dict:
    """PSS (KiB) of the MEP's root processes and of its broker, and how many UEPs (other
    users' processes) its tree holds."""
    root = broker = ueps = 0
    for p, (uid, _) in tree(pid).items():
        try:
            value = rollup(p)["Pss"]
        except OSError:
            continue
        if uid == 0:
            root += value
        elif uid == broker_uid:
            broker += value
        else:
            ueps += 1
    return {"root_kib": root, "broker_kib": broker, "whole_kib": root + broker, "uep_processes": ueps}


def sdk_round(driver: Driver, m, users: list, timeout: float) -> dict:
    """One submission by each user to MEP `m`; times in s from the first submission."""
    out = driver.submit(m.endpoint_id, users, timeout)
    t0 = out["t0_ns"]
    execs, mep_ms = [], []
    for a in out["answered"]:
        name = uep_id(m.endpoint_id, bench_mep.identity(f"{a['user']}@bench.example")["id"], a["config"] or {},
                      a["runtime"] or {})
        try:
            t_exec = int((m.reports / name).read_text())
        except (OSError, ValueError):
            continue
        execs.append(t_exec)
        mep_ms.append((t_exec - a["t_ns"]) / 1e6)
    done = list(out["done_ns"].values())
    return {"all_results_s": (max(done) - t0) / 1e9 if done else None, "all_exec_s": (max(execs) - t0) / 1e9 if execs else None,
            "mep_ms": mep_ms, "no_result": len(out["errors"]), "no_exec": len(users) - len(execs),
            "errors": list(out["errors"].values())[:3]}


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def measure(fx: fixture.Fixture, reps: int = 3, bursts=(20, 50), burst_reps: int = 1, live=(20, 200),
            say=print) -> dict:
    """`reps` cold starts each, `burst_reps` bursts of each size in `bursts`, PSS at each
    count of live probe UEPs in `live`; the JSON that bench.run merges (summary: the table)."""
    users = [a.pw_name for a in fx.accounts]
    homes(fx.accounts)
    service = Service(fx, fx.dir / "compare", users, clients=("upstream",))
    meps, driver = {}, None
    results = {"reps": reps, "burst_reps": burst_reps, "cold": {}, "burst": {}, "memory": {}, "hangs": {}}
    try:
        meps["ours"] = bench_mep.MEP(fx, config={"compute_service_url": SERVICE_URL, "mu_child_ep_grace_period_s": 5,
                                                 "compute_service_token_file": str(service.admin_token)},
                                     template=TEMPLATE, schema=SCHEMA, uep_argv=[fx.probe, "_start-user-endpoint"],
                                     registration=False, environment={"MEPB_EXEC": UEP_PROGRAM})
        meps["upstream"] = Upstream(fx, service, template=TEMPLATE, schema=SCHEMA,
                                    environment={"MEPB_EXEC": f"{UEP_VENV}/bin/globus-compute-endpoint"})
        broker_uid = {"ours": fx.broker.pw_uid, "upstream": None}
        for name, m in meps.items():
            results["memory"].setdefault("idle", {})[name] = pss(m.proc.pid, broker_uid[name])
        driver = Driver(service, fx.dir / "compare")
        order = lambda i: list(meps) if i % 2 == 0 else list(meps)[::-1]  # noqa: E731

        def run(name, batch, timeout, key, after=None):
            r = sdk_round(driver, meps[name], batch, timeout)
            results["hangs"].setdefault(name, {"starts": 0, "no_result": 0, "no_exec": 0, "errors": []})
            h = results["hangs"][name]
            h["starts"] += len(batch)
            h["no_result"] += r["no_result"]
            h["no_exec"] += r["no_exec"]
            h["errors"] += r["errors"]
            key.setdefault(name, []).append(r)
            if after:
                after(name)
            end_ueps(batch)

        say(f"ours vs upstream: warm-up, then {reps} cold starts each, interleaved")
        for name in meps:
            run(name, [users[-1]], 120, results.setdefault("warmup", {}))
        for i in range(reps):
            for name in order(i):
                run(name, [users[i % len(users)]], 120, results["cold"])
        for n in bursts:
            say(f"ours vs upstream: a burst of {n} users, {burst_reps} time(s) each")
            for i in range(burst_reps):
                for name in order(i):
                    snap = (lambda name: results["memory"].setdefault(f"{n} real UEPs", {}).setdefault(
                        name, pss(meps[name].proc.pid, broker_uid[name]))) if n == bursts[0] else None
                    run(name, users[:n], 180, results["burst"].setdefault(str(n), {}), after=snap)
        prev = 0
        for n in live:
            say(f"ours vs upstream: {n} live probe UEPs each")
            for name, m in meps.items():
                queue = f"mep.{m.endpoint_id}.command"
                t0 = time.monotonic()
                sent = asyncio.run(bench_mep.offer(queue, f"mepb-hb-{name}", users, n - prev, 200, f"hold600-{n}-"))
                try:
                    bench_mep.wait_reports(m.reports, list(sent), 120)
                except RuntimeError as e:
                    results["hangs"][name]["probe_starts_missing"] = str(e)
                results["memory"].setdefault(f"{n} probe UEPs", {})[name] = {
                    **pss(m.proc.pid, broker_uid[name]), "started_s": time.monotonic() - t0}
                results["hangs"][name]["starts"] += n - prev
            prev = n
        say("ours vs upstream: stop each, count what is left")
        for name, m in meps.items():
            before = tree(m.proc.pid)
            t0 = time.monotonic()
            m.stop()
            stopped = time.monotonic() - t0
            deadline = time.monotonic() + 15
            while (left := tree_alive(before)) and time.monotonic() < deadline:
                time.sleep(0.2)
            results["hangs"][name].update({
                "stop_s": stopped, "processes_at_stop": len(before),
                "orphans": len(left), "orphans_root": sum(1 for uid, _ in left.values() if uid == 0),
                "orphan_cmdlines": [cmdline(p) for p in list(left)[:5]]})
    finally:
        if driver is not None:
            driver.stop()
        for m in meps.values():
            if m.proc.poll() is None:
                m.stop()
        service.stop()
        end_ueps(users, 5)
    results["summary"] = summary(results)
    return results


def tree_alive(before: dict) -> dict:
    """Those of `before` (pid -> (uid, start time)) that still run (the same start time)."""
    out = {}
    for p, (uid, start) in before.items():
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[19] == start:
                    out[p] = (uid, start)
        except OSError:
            pass
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


def summary(results: dict) -> dict:
    """figure -> {"ours", "upstream", "ratio"} (medians over the repetitions)."""
    rows = {}

    def add(figure, value):
        ours, upstream = value("ours"), value("upstream")
        rows[figure] = {"ours": ours, "upstream": upstream,
                        "ratio": ours / upstream if ours is not None and upstream else None}
    cold = results["cold"]
    add("cold start, submit -> result (s)", lambda n: median(r["all_results_s"] for r in cold.get(n, [])))
    add("cold start, the MEP's share (ms)", lambda n: median(r["mep_ms"][0] for r in cold.get(n, []) if r["mep_ms"]))
    for size, runs in results["burst"].items():
        add(f"burst of {size}: every result (s)", lambda n: median(r["all_results_s"] for r in runs.get(n, [])))
        add(f"burst of {size}: every UEP exec'd (s)", lambda n: median(r["all_exec_s"] for r in runs.get(n, [])))
        add(f"burst of {size}: the MEP's share, median UEP (ms)",
            lambda n: median(median(r["mep_ms"]) for r in runs.get(n, [])))
    for state, by in results["memory"].items():
        add(f"root PSS, {state} (MiB)", lambda n: by[n]["root_kib"] / 1024 if n in by else None)
        add(f"whole-MEP PSS, {state} (MiB)", lambda n: by[n]["whole_kib"] / 1024 if n in by else None)
    return rows


def table(results: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3g}" if v < 100 else f"{v:.0f}"  # noqa: E731
    rows = [f"{'ours vs upstream':52} {'ours':>8} {'upstream':>9} {'ratio':>6}"]
    for figure, r in results["summary"].items():
        rows.append(f"{figure:52} {fmt(r['ours']):>8} {fmt(r['upstream']):>9} {fmt(r['ratio']):>6}")
    for name, h in results["hangs"].items():
        rows.append(f"{name}: {h['starts']} starts, {h['no_result']} without a result, {h['no_exec']} without an "
                    f"exec; stop {h.get('stop_s', 0):.1f} s, {h.get('orphans', '-')} processes left "
                    f"({h.get('orphans_root', '-')} root)")
    return "\n".join(rows)


def plot(results: dict, out) -> str | None:
    """compare.png: the times (the MEP's part darker), the MEP's share, and PSS, ours beside upstream's."""
    import matplotlib.pyplot as plt
    s = results["summary"]
    colours = {"ours": "tab:blue", "upstream": "tab:orange"}
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.8))
    times = [("cold", "cold start, submit -> result (s)", None)] + [
        (f"burst {n}", f"burst of {n}: every result (s)", f"burst of {n}: every UEP exec'd (s)") for n in results["burst"]]
    for i, (label, total, mep_part) in enumerate(times):
        for j, who in enumerate(colours):
            x = i + (j - 0.5) * 0.38
            ax.bar(x, s[total][who] or 0, 0.36, color=colours[who], alpha=0.45, label=who if i == 0 else None)
            if mep_part:
                ax.bar(x, s[mep_part][who] or 0, 0.36, color=colours[who], label=None)
    ax.set_xticks(range(len(times)), [t[0] for t in times])
    ax.set_ylabel("s from the first submission (dark: every UEP exec'd)")
    ax.legend()
    shares = [k for k in s if "MEP's share" in k]
    for j, who in enumerate(colours):
        ax2.bar([i + (j - 0.5) * 0.38 for i in range(len(shares))], [s[k][who] or 0 for k in shares], 0.36,
                color=colours[who], label=who)
    ax2.set_xticks(range(len(shares)), [k.split(",")[0].split(":")[0] for k in shares], fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("the MEP's share: submit answered -> UEP exec'd, ms")
    states = list(results["memory"])
    for j, who in enumerate(colours):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(states))]
        ax3.bar(xs, [s[f"whole-MEP PSS, {st} (MiB)"][who] or 0 for st in states], 0.36, color=colours[who], alpha=0.45)
        ax3.bar(xs, [s[f"root PSS, {st} (MiB)"][who] or 0 for st in states], 0.36, color=colours[who], label=who)
    ax3.set_xticks(range(len(states)), [st.replace(" UEPs", "") for st in states], fontsize=8)
    ax3.set_ylabel("PSS, MiB (dark: root; light: + our broker)")
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=110)
    return str(path)


if __name__ == "__main__":
    with fixture.Fixture(users=50) as fx:
        data = measure(fx, *(int(a) for a in sys.argv[1:2]))
        print(json.dumps(data, indent=1))
        print(table(data))
