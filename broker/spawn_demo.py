"""A tiny broker for the foundation demo: spawns the probe as each named user through the
helper and prints what the probe saw from inside its process.

Run by the helper in --launch mode as the broker account, with the helper connection on
the fd named by MEP_HELPER_FD. The real broker (broker.main) replaces it in production.
"""

import argparse
import asyncio
import json
import os
import pwd
import sys

from broker.helper_client import HelperClient, HelperRefused


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Spawn the probe UEP as each user and print its view.")
    parser.add_argument("--key", required=True, help="the per-MEP HMAC key file (group-readable by the broker)")
    parser.add_argument("--user", action="append", required=True, help="a local account to spawn as (repeatable)")
    return parser.parse_args(argv)


async def read_line(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: os.fdopen(fd, "rb").readline())


def describe(name: str, seen: dict) -> str:
    caps = " ".join(f"{k}={v}" for k, v in seen["caps"].items())
    return (f"  {name}: pid {seen['pid']} uid/euid/suid {tuple(seen['resuid'])} gid {tuple(seen['resgid'])} "
            f"groups {seen['groups']}\n    {caps}\n    NoNewPrivs={seen['no_new_privs']} "
            f"setuid(0) {seen['setuid0']}, session leader {seen['sid'] == seen['pid']}, umask {seen['umask']:04o}, "
            f"fds {sorted(int(f) for f in seen['fds'])}")


async def main_async(args) -> int:
    key = open(args.key, "rb").read()
    exited = {}
    client = await HelperClient.connect_fd(int(os.environ["MEP_HELPER_FD"]), key,
                                           on_exit=lambda pid, status: exited.setdefault(pid, status))
    print(f"broker: running as uid {os.getuid()} ({pwd.getpwuid(os.getuid()).pw_name}), "
          f"connected to the helper", flush=True)
    failures = 0
    for name in args.user:
        try:
            pw = pwd.getpwnam(name)
            result = await client.spawn(name, pw.pw_uid, f"demo-{name}", stdin=b'{"sleep": 0}', channels=("audit",))
        except (KeyError, HelperRefused) as e:
            print(f"  {name}: {e}", flush=True)
            failures += 1
            continue
        seen = json.loads(await read_line(result.fds["audit"]))
        print(describe(name, seen), flush=True)
    for _ in range(100):
        if len(exited) >= len(args.user) - failures:
            break
        await asyncio.sleep(0.05)
    print(f"broker: {len(exited)} UEP(s) exited with status {sorted(exited.values())}; closing", flush=True)
    client.close()
    return 1 if failures else 0


def main(argv=None) -> int:
    return asyncio.run(main_async(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
