"""Spawn latency and throughput: our helper (PAM off and on) against runuser, setpriv, sudo
and a bare fork+setuid+exec from an already-running root Python process (upstream's way),
without and with the same PAM stack in the forked child.

Latency is from the moment the request is written (our helper) or the command is started
(baselines) to the probe's first instruction after exec: the static probe (bench/probe.c)
reads CLOCK_MONOTONIC first thing and reports it, so both ends use the same clock.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import subprocess
import sys
import time

from bench import fixture
from broker.helper_client import HelperClient
from privhelper.pam import PamTransaction


def bare_fork(account: pwd.struct_passwd, probe: str, pam_service: str | None = None) -> int:
    """Upstream's way: fork from the running root process, drop, exec; report via a pipe.
    With `pam_service`, the child first runs PAM's account, setcred and open_session, as
    upstream's child does (a lower bound: nothing stays behind to close the session)."""
    r, w = os.pipe()
    t0 = time.monotonic_ns()
    pid = os.fork()
    if pid == 0:
        try:
            if pam_service:
                PamTransaction(pam_service, account.pw_name).open()
            os.dup2(w, 1)
            os.initgroups(account.pw_name, account.pw_gid)
            os.setresgid(account.pw_gid, account.pw_gid, account.pw_gid)
            os.setresuid(account.pw_uid, account.pw_uid, account.pw_uid)
            os.execv(probe, [probe])
        finally:
            os._exit(127)
    os.close(w)
    with os.fdopen(r) as f:
        t1 = int(f.read())
    os.waitpid(pid, 0)
    return t1 - t0


def command(argv: list) -> int:
    t0 = time.monotonic_ns()
    out = subprocess.run(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, check=True).stdout
    return int(out) - t0


def baselines(user: str, probe: str, pam_service: str | None = None) -> dict:
    account = pwd.getpwnam(user)
    pam = {"bare fork+PAM+setuid+exec": lambda: bare_fork(account, probe, pam_service)} if pam_service else {}
    return {
        "runuser": lambda: command(["runuser", "-u", user, "--", probe]),
        "setpriv": lambda: command(["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                                    "--init-groups", "--", probe]),
        "sudo": lambda: command(["sudo", "-n", "-u", user, probe]),
        "bare fork+setuid+exec": lambda: bare_fork(account, probe),
        **pam,
    }


class Helper:
    """Our helper on a socketpair (`--fd`), driven by the broker's own asyncio client."""

    def __init__(self, policy):
        ours, theirs = socket.socketpair()
        self.log = open(policy.with_suffix(".log"), "a")  # the helper's own log, for when it refuses
        self.proc = subprocess.Popen(fixture.helper_argv(policy, "--fd", str(theirs.fileno())),
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log)
        theirs.close()
        self.sock = ours

    async def connect(self, key: bytes) -> HelperClient:
        client = HelperClient(self.sock, key)
        await client.ready
        return client

    def stop(self) -> None:
        self.sock.close()
        self.proc.wait(30)
        self.log.close()


exits: dict[int, asyncio.Future] = {}


def on_exit(pid: int, status: int) -> None:
    future = exits.setdefault(pid, asyncio.get_running_loop().create_future())
    if not future.done():
        future.set_result(status)


async def spawn_once(client: HelperClient, account: pwd.struct_passwd) -> int:
    """One spawn, timed to the probe's first instruction; returns after the probe exited."""
    t0 = time.monotonic_ns()
    result = await client.spawn(account.pw_name, account.pw_uid, "bench", {}, b"", ("audit",))
    exited = exits.setdefault(result.pid, asyncio.get_running_loop().create_future())  # it may be done already
    fd = result.fds["audit"]
    try:
        t1 = int(await asyncio.to_thread(os.read, fd, 64))
    finally:
        os.close(fd)
    await exited
    del exits[result.pid]
    return t1 - t0


async def helper_latency(policy, key: bytes, account, n: int) -> list:
    helper = Helper(policy)
    try:
        client = await helper.connect(key)
        client.on_exit = on_exit
        for _ in range(5):  # warm-up
            await spawn_once(client, account)
        return [await spawn_once(client, account) for _ in range(n)]
    finally:
        helper.stop()


async def helper_burst(policy, key: bytes, accounts: list, total: int, concurrency: int | None = None) -> float:
    """`total` spawn requests over `accounts`, at most `concurrency` in flight (all at
    once by default); spawns/s."""
    helper = Helper(policy)
    gate = asyncio.Semaphore(concurrency or total)

    async def one(i):
        async with gate:
            await spawn_once(client, accounts[i % len(accounts)])
    try:
        client = await helper.connect(key)
        client.on_exit = on_exit
        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(total)))
        return total / (time.monotonic() - t0)
    finally:
        helper.stop()


async def baseline_burst(make, accounts: list, total: int, concurrency: int = 32) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one(i):
        async with gate:
            await asyncio.to_thread(make(accounts[i % len(accounts)].pw_name))
    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(total)))
    return total / (time.monotonic() - t0)


ROUNDS = 6  # the candidates take turns, so that the machine's drift falls on all of them alike


def measure(fx: fixture.Fixture, n: int, burst: int, say=print) -> dict:
    account = fx.accounts[0]
    base = baselines(account.pw_name, fx.probe, fx.pam_service)
    latency = {name: [] for name in ["helper (PAM off)", "helper (PAM on)", *base]}
    throughput, per = {}, max(1, n // ROUNDS)
    for r in range(ROUNDS):
        say(f"spawn latency, round {r + 1} of {ROUNDS}: {per} spawns each of {', '.join(latency)}")
        latency["helper (PAM off)"] += asyncio.run(helper_latency(fx.policy_nopam, fx.key, account, per))
        latency["helper (PAM on)"] += asyncio.run(helper_latency(fx.policy_pam, fx.key, account, per))
        for name, run in base.items():
            for _ in range(3):  # warm-up
                run()
            latency[name] += [run() for _ in range(per)]
    say(f"spawn throughput: {burst} requests over {len(fx.accounts)} users")
    throughput["helper (PAM off)"] = asyncio.run(helper_burst(fx.policy_nopam, fx.key, fx.accounts, burst))
    throughput["helper (PAM on)"] = asyncio.run(helper_burst(fx.policy_pam, fx.key, fx.accounts, burst))
    for name in ("runuser", "setpriv"):
        throughput[name] = asyncio.run(baseline_burst(lambda u, name=name: baselines(u, fx.probe)[name],
                                                      fx.accounts, burst))
    return {"latency_ns": latency, "throughput_per_s": throughput}


if __name__ == "__main__":
    with fixture.Fixture(users=int(sys.argv[1]) if len(sys.argv) > 1 else 50) as fx:
        print(measure(fx, 50, 100))
