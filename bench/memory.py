"""The helper's resident memory: idle, with 100 live children, and across many
spawn-and-reap cycles (a leak shows as growth after the warm-up)."""

from __future__ import annotations

import asyncio
import os

from bench import spawn


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def helper_memory(fx, cycles: int, live: int = 100, say=print) -> dict:
    helper = spawn.Helper(fx.policy_nopam)
    try:
        client = await helper.connect(fx.key)
        client.on_exit = spawn.on_exit
        idle = rss_kib(helper.proc.pid)
        say(f"helper memory: {live} live children (probes named 'hold' stay 5 s)")
        holds = [await client.spawn(a.pw_name, a.pw_uid, "hold", {}, b"", ("audit",))
                 for a in (fx.accounts[i % len(fx.accounts)] for i in range(live))]
        with_children = rss_kib(helper.proc.pid)
        for result in holds:
            os.close(result.fds["audit"])
        await asyncio.gather(*(spawn.exits.setdefault(r.pid, asyncio.get_running_loop().create_future())
                               for r in holds))
        say(f"helper memory: {cycles} spawn-and-reap cycles")
        account = fx.accounts[0]
        warm = max(200, cycles // 20)
        for _ in range(warm):
            await spawn.spawn_once(client, account)
        after_warmup = rss_kib(helper.proc.pid)
        for _ in range(cycles):
            await spawn.spawn_once(client, account)
        after = rss_kib(helper.proc.pid)
        return {"idle_kib": idle, f"with_{live}_children_kib": with_children, "after_warmup_kib": after_warmup,
                f"after_{cycles}_cycles_kib": after, "growth_per_cycle_bytes": (after - after_warmup) * 1024 / cycles,
                "growth_kib": after - after_warmup, "cycles": cycles}
    finally:
        helper.stop()


def measure(fx, cycles: int, say=print) -> dict:
    return asyncio.run(helper_memory(fx, cycles, say=say))
