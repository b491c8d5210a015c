"""`mepctl start` mode: the root parent becomes the helper; the child execs the broker as
the broker account (no caps, NO_NEW_PRIVS, PDEATHSIG) with its socket end as fd 3; of the
helper's environment only policy.BROKER_ENV (and GLOBUS_SDK_*) reaches it."""

import os
import pwd
import signal
import socket

from privhelper import child
from privhelper.authorize import Account
from privhelper.policy import BROKER_ENV

BROKER_FD = 3


class LaunchError(Exception):
    pass


def start_broker(policy, flags: tuple = ()) -> tuple:
    """`flags`: only --log-to-console and --debug (the helper's own argv offers no others)."""
    if not policy.broker_argv:
        raise LaunchError(f"{policy.path}: broker_argv is not set; it names the broker program to start")
    account = Account.of(pwd.getpwnam(policy.broker_user))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    extra = {k: v for k, v in os.environ.items() if k in BROKER_ENV or k.startswith("GLOBUS_SDK_")}
    extra["MEP_HELPER_FD"] = str(BROKER_FD)
    devnull = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # fork_exec holds the stops; the helper must get them back
    pid, failure = child.fork_exec(account, (*policy.broker_argv, *flags), child.build_env(account, policy, {}, extra),
                                   {0: devnull, 1: 1, 2: 2, BROKER_FD: theirs.fileno()}, no_new_privs=True)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    theirs.close()
    os.close(devnull)
    if failure:
        raise LaunchError(f"cannot start the broker as {account.name}: {failure}")
    return ours, pid
