"""`mepctl start` mode: the root parent becomes the helper, the child becomes the broker.

The broker gets its end of a socketpair as fd 3 (MEP_HELPER_FD=3), runs as the policy's
broker account with no capabilities and NO_NEW_PRIVS, and dies with the helper.
"""

import os
import pwd
import socket

from privhelper import child
from privhelper.authorize import Account

BROKER_FD = 3


class LaunchError(Exception):
    pass


def start_broker(policy) -> tuple:
    if not policy.broker_argv:
        raise LaunchError(f"{policy.path}: broker_argv is not set; it names the broker program to start")
    pw = pwd.getpwnam(policy.broker_user)
    account = Account(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell,
                      tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid)))))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    extra = {"MEP_HELPER_FD": str(BROKER_FD)}
    if "TERM" in os.environ:  # for the broker's foreground timer line on a TTY
        extra["TERM"] = os.environ["TERM"]
    env = child.build_env(account, policy, {}, extra)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    me = os.getpid()
    if (pid := os.fork()) == 0:
        devnull = os.open("/dev/null", os.O_RDONLY)
        child.exec_child(account=account, argv=policy.broker_argv, env=env, err_w=err_w, no_new_privs=True,
                         plan={0: devnull, 1: 1, 2: 2, BROKER_FD: theirs.fileno()}, parent_pid=me)
    theirs.close()
    os.close(err_w)
    if failure := child.read_all(err_r):
        os.waitpid(pid, 0)
        raise LaunchError(f"cannot start the broker as {account.name}: {failure.decode('utf-8', 'replace')}")
    return ours, pid
