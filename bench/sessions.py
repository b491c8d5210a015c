"""Root memory per live UEP: the helper with N live probe UEPs ("holdN"), PAM off and on;
the PSS and private dirty pages of the helper and of every session process, from
/proc/PID/smaps_rollup (PSS shares each page among the processes that map it, so the
sum over processes is what they cost the machine together)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from bench import spawn


def rollup(pid: int) -> dict:
    """kB figures of /proc/PID/smaps_rollup: Pss, Private_Dirty, Rss."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Private_Dirty", "Private_Clean", "Shared_Clean", "Shared_Dirty"):
                out[key] = int(rest.split()[0])
    return out


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sample(pid: int, t0: float, out: list, every: float = 0.5) -> None:
    """Until cancelled: time, the helper's CPU seconds, live session processes, root PSS."""
    while True:
        with contextlib.suppress(OSError):
            mem = root_memory(pid)
            out.append({"t_s": round(time.monotonic() - t0, 2), "helper_cpu_s": cpu_s(pid),
                        "sessions": mem["sessions"], "root_pss_mib": round(mem["root_pss_kib"] / 1024, 1)})
        await asyncio.sleep(every)


def children(pid: int) -> list:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def root_memory(pid: int) -> dict:
    """The helper and its session processes (not the UEPs, which are the users')."""
    helper = rollup(pid)
    sessions = [rollup(c) for c in children(pid)]
    total = {k: helper[k] + sum(s[k] for s in sessions) for k in helper}
    return {"helper_kib": helper, "sessions": len(sessions),
            "sessions_pss_kib": sum(s["Pss"] for s in sessions),
            "sessions_private_dirty_kib": sum(s["Private_Dirty"] for s in sessions),
            "root_pss_kib": total["Pss"]}


async def live(policy, key: bytes, accounts: list, n: int, hold_s: int, say=print) -> dict:
    helper = spawn.Helper(policy)
    try:
        client = await helper.connect(key)
        client.on_exit = spawn.on_exit
        idle, idle_cpu = root_memory(helper.proc.pid), cpu_s(helper.proc.pid)
        t0, series = time.monotonic(), []
        sampler = asyncio.create_task(sample(helper.proc.pid, t0, series))
        results = await asyncio.gather(*(client.spawn(a.pw_name, a.pw_uid, f"hold{hold_s}", {}, b"", ())
                                         for a in (accounts[i % len(accounts)] for i in range(n))))
        spawned_s, spawn_cpu = time.monotonic() - t0, cpu_s(helper.proc.pid)
        await asyncio.sleep(1)
        full = root_memory(helper.proc.pid)
        t1 = time.monotonic()
        for r in results:
            os.killpg(r.pid, 15)
        await asyncio.gather(*(spawn.exits.setdefault(r.pid, asyncio.get_running_loop().create_future()) for r in results))
        stopped_s = time.monotonic() - t1
        sampler.cancel()
        for r in results:
            spawn.exits.pop(r.pid, None)
        per = (full["root_pss_kib"] - idle["root_pss_kib"]) / n
        say(f"root memory, {n} live UEPs: root PSS {full['root_pss_kib'] / 1024:.1f} MiB, "
            f"{per:.0f} KiB per UEP (session processes: {full['sessions_pss_kib'] / n:.0f} KiB PSS, "
            f"{full['sessions_private_dirty_kib'] / n:.0f} KiB private dirty each)")
        return {"n": n, "idle": idle, "live": full, "root_pss_per_uep_kib": per, "spawn_s": spawned_s,
                "spawns_per_s": n / spawned_s, "helper_cpu_s_for_spawns": spawn_cpu - idle_cpu,
                "all_exited_after_term_s": stopped_s, "series": series}
    finally:
        helper.stop()


def measure(fx, counts=(100, 1000), say=print) -> dict:
    """`counts` live UEPs, PAM off and on, each in its own helper; the probes hold 120 s (TERMed at the end)."""
    return {f"{n} live, {pam}": asyncio.run(live(policy, fx.key, fx.accounts, n, 120, say))
            for n in counts for pam, policy in (("PAM off", fx.policy_nopam), ("PAM on", fx.policy_pam))}


if __name__ == "__main__":
    import json
    import sys
    from bench import fixture
    with fixture.Fixture(users=50) as fx:
        print(json.dumps(measure(fx, [int(a) for a in sys.argv[1:]] or (100, 1000)), indent=1))
