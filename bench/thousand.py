"""A thousand live UEPs on one MEP: the real MEP (helper --launch, the installed broker)
with the static probe as the UEP program, N start commands over the bench's 50 users.
Measures: how fast they all start, the helper's CPU and root PSS over time, how long
`mepctl list` and `mepctl status` take while they run (the CLI, a new process each time,
as an administrator runs it), that a hot restart (SIGHUP to the helper) keeps every UEP,
and how long a stop takes to end them all."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

from bench import fixture, sessions
from bench.mep import MEP

MEPCTL = f"{sys.prefix}/bin/mepctl"


def mepctl(mep: MEP, op: str) -> tuple:
    """(seconds, parsed JSON reply) of one `mepctl OP` run."""
    t0 = time.monotonic()
    out = subprocess.run([MEPCTL, op, "bench", "--socket", str(mep.dir / "run" / "admin.sock"), "--json"],
                         capture_output=True, text=True, timeout=60)
    return time.monotonic() - t0, json.loads(out.stdout or "{}")


def sessions_of(mep: MEP) -> set:
    return set(sessions.children(mep.proc.pid)) - {mep.broker_pid()}


def exit_statuses(mep: MEP) -> dict:
    """How the UEPs ended, from the helper's `exited pid=P status=S` lines: status -> count.
    -9 means a KILL after the grace period (the broker's or the helper's); a probe that
    obeyed the stop's TERM ends with -15."""
    counts = {}
    for status in re.findall(r"exited pid=\d+ status=(-?\d+)", (mep.dir / "helper.log").read_text()):
        counts[int(status)] = counts.get(int(status), 0) + 1
    return counts


def measure(fx: fixture.Fixture, n: int = 1000, say=print) -> dict:
    mep = MEP(fx)
    out = {"n": n}
    try:
        users = [a.pw_name for a in fx.accounts]
        series, t0 = [], time.monotonic()
        say(f"{n} live UEPs on one MEP: start commands at 500/s")

        async def start():
            sampler = asyncio.create_task(sessions.sample(mep.proc.pid, t0, series, every=1.0))
            await mep.offer(users, n, 500, "hold600-")
            await asyncio.to_thread(mep.wait_reports, [f"hold600-{i:05d}" for i in range(n)], 300)
            out["all_started_s"] = time.monotonic() - t0
            await asyncio.sleep(2)
            sampler.cancel()
        asyncio.run(start())
        out["starts_per_s"] = n / out["all_started_s"]
        out["series"] = series
        out["root"] = sessions.root_memory(mep.proc.pid)
        out["root"]["helper_cpu_s"] = sessions.cpu_s(mep.proc.pid)
        before = sessions_of(mep)
        out["session_processes"] = len(before)
        for op in ("list", "status"):
            times, reply = [], {}
            for _ in range(5):
                took, reply = mepctl(mep, op)
                times.append(took)
            out[f"mepctl_{op}_s"] = {"max": max(times), "median": sorted(times)[2]}
            out[f"{op}_complete"] = (len(reply.get("user_endpoints", [])) if op == "list" else
                                     reply.get("user_endpoints")) == n
        say(f"hot restart (SIGHUP) with {n} UEPs")
        broker, consuming = mep.broker_pid(), mep.output().count("consuming start commands")
        t1 = time.monotonic()
        os.kill(mep.proc.pid, signal.SIGHUP)
        while time.monotonic() < t1 + 30 and mep.output().count("consuming start commands") == consuming:
            time.sleep(0.1)
        out["hup_to_consuming_s"] = time.monotonic() - t1
        out["after_hup"] = {"same_session_processes": sessions_of(mep) == before, "broker_pid_kept": mep.broker_pid() == broker,
                            "listed": len(mepctl(mep, "list")[1].get("user_endpoints", []))}
        say(f"stop with {n} UEPs")
        t1 = time.monotonic()
        mep.stop()
        out["stop_s"] = time.monotonic() - t1
        left = subprocess.run(["pgrep", "-f", fx.probe], capture_output=True, text=True).stdout.split()
        out["probes_left_after_stop"] = len(left)
        out["exits_after_stop"] = exit_statuses(mep)
        log = mep.output()
        out["stop_notices"] = {"sent": log.count("failure notice sent"), "not sent": log.count("could not be sent")}
        return out
    finally:
        if mep.proc.poll() is None:
            mep.stop()


if __name__ == "__main__":
    with fixture.Fixture(users=50) as fx:
        print(json.dumps(measure(fx, int(sys.argv[1]) if len(sys.argv) > 1 else 1000), indent=1))
