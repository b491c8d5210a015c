"""After fork: the session process (root; holds PAM open for the UEP's life) and the UEP
child's drop to the user with no way back. Never runs in the helper itself."""

import _signal  # signal's C core (see reset_signals)
import contextlib
import fcntl
import os
import signal
import time

from privhelper import linux, log
from privhelper.authorize import Refusal
from privhelper.pam import PamError, PamTransaction
from privhelper.policy import FIXED_ENV
from protocol.messages import CHANNEL_FDS

ERR_FD = 5  # the child's close-on-exec error pipe: EOF there means exec succeeded
_CAP_KEYS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


class _Stop(Exception):
    pass


# (valid_signals() already leaves out glibc's own 32 and 33, which sigaction refuses)
_RESETTABLE = tuple(int(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))


def reset_signals(unblock: bool = True) -> None:
    """In forked children, where each page written is copied: no exceptions, no enum-converting wrappers."""
    for sig in _RESETTABLE:
        _signal.signal(sig, _signal.SIG_DFL)
    if unblock:
        _signal.pthread_sigmask(signal.SIG_SETMASK, ())


def place_fds(plan: dict, err_w: int) -> None:
    """Install plan {target fd: source fd} and the error pipe at ERR_FD (close-on-exec);
    close everything else. Sources move above the targets first (only just above:
    pam_limits may have lowered RLIMIT_NOFILE)."""
    moved = {t: fcntl.fcntl(s, fcntl.F_DUPFD_CLOEXEC, ERR_FD + 1) for t, s in {**plan, ERR_FD: err_w}.items()}
    for target, source in moved.items():
        os.dup2(source, target, inheritable=target != ERR_FD)
    os.closerange(ERR_FD + 1, os.sysconf("SC_OPEN_MAX"))
    for fd in {3, 4} - set(plan):
        with contextlib.suppress(OSError):
            os.close(fd)


def drop_privileges(uid: int, gid: int, groups: tuple, no_new_privs: bool, keep_bounding: bool = False) -> None:
    """Become uid/gid with exactly `groups` and no capabilities; verify every bit of it.
    `keep_bounding` (PAM on, NO_NEW_PRIVS off, the policy's keep_bounding_set): a setuid
    program the site relies on gets the capabilities it would get from a login shell."""
    linux.prctl(linux.PR_SET_KEEPCAPS, 0)
    if not keep_bounding:
        linux.drop_bounding_set()  # needs CAP_SETPCAP, so before the uid change
    linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
    os.setresgid(gid, gid, gid)
    os.setgroups(groups)  # exactly what authorize() checked (docs/decisions.md)
    os.setresuid(uid, uid, uid)
    linux.clear_capabilities()  # the uid change clears permitted/effective, not inheritable
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise Refusal("setup-failed", f"ids after the drop are {os.getresuid()}/{os.getresgid()}")
    if tuple(sorted(set(os.getgroups()))) != tuple(groups):
        raise Refusal("setup-failed", f"groups after the drop are {sorted(os.getgroups())}, expected {list(groups)}")
    with contextlib.suppress(PermissionError):
        os.setuid(0)
        raise Refusal("setup-failed", "setuid(0) succeeded after the drop")
    status = linux.proc_status()
    if left := {k: status[k] for k in _CAP_KEYS if int(status[k], 16) and not (keep_bounding and k == "CapBnd")}:
        raise Refusal("setup-failed", f"capabilities left after the drop: {left}")
    if no_new_privs:
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        if linux.prctl(linux.PR_GET_NO_NEW_PRIVS) != 1:
            raise Refusal("setup-failed", "NO_NEW_PRIVS did not stick")


def follow_parent(parent_pid: int, sig: int) -> None:
    """Die with the parent. Set after the uid change (which clears it), then check that
    the parent did not already go before it was set."""
    linux.prctl(linux.PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent_pid:
        os._exit(1)


def exec_child(*, account, argv, env, plan, err_w, no_new_privs, parent_pid, keep_bounding=False):
    """In the forked UEP (or broker) child. Never returns; a failure is written, as
    "CODE reason", to the error pipe before _exit."""
    err_fd, step = err_w, "setsid"
    try:
        os.setsid()
        step = "signals"
        reset_signals()
        step = "fds"
        place_fds(plan, err_w)
        err_fd, step = ERR_FD, "privilege drop"
        drop_privileges(account.uid, account.gid, account.groups, no_new_privs, keep_bounding)
        step = "parent-death signal"
        follow_parent(parent_pid, signal.SIGKILL)
        try:
            os.chdir(account.home)
        except OSError:
            os.chdir("/")
        os.umask(0o077)
        step = "exec"
        try:
            os.execve(argv[0], list(argv), env)
        except OSError as e:
            raise Refusal("exec-failed", f"cannot exec {argv[0]}: {e.strerror}") from None
    except BaseException as e:  # noqa: BLE001 - anything at all must end in _exit
        code, reason = (e.code, e.reason) if isinstance(e, Refusal) else ("setup-failed", f"{step}: {e!r}")
        try:
            os.write(err_fd, f"{code} {reason}".encode()[:1000])
        finally:
            os._exit(127)


def build_env(account, policy, pam_env: dict, extra: dict) -> dict:
    env = {"HOME": account.home, "USER": account.name, "LOGNAME": account.name, "SHELL": account.shell,
           "PATH": policy.path_env, "LANG": policy.lang}
    for name, value in pam_env.items():
        if name in FIXED_ENV or policy.env_denied(name):
            log.warning("PAM service %s set %s for %s; dropped (helper env deny-list)", policy.pam.service, name, account.name)
        else:
            env[name] = value
    return {**env, **extra}  # `extra` was checked against the deny-list by authorize()


def _report(fd: int, line: str) -> None:
    with contextlib.suppress(BrokenPipeError):  # the helper is gone: nobody to tell, but PAM still closes
        os.write(fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))


_STOPS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def session_process(*, account, req, policy, child_fds, status_w, helper_pid, title="") -> None:
    """Body of the per-UEP session process (root). Never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # out of the terminal's foreground group: Ctrl+C is for the helper, which asks the broker
        if title:  # so that `ps` tells it from the helper it was forked from
            linux.set_title(f"{title} [session of {account.name}]")
        follow_parent(helper_pid, signal.SIGTERM)
        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)  # what the UEP orphans comes to us, not to init
        for sig in _STOPS:
            _signal.signal(sig, _raise_stop)
        _signal.signal(signal.SIGPIPE, _signal.SIG_IGN)  # EPIPE, not death, when the helper is gone (reset_signals undoes it in the UEP)
        _signal.pthread_sigmask(signal.SIG_SETMASK, ())
        code = _run_session(account, req, policy, child_fds, status_w)
    except BaseException as e:  # noqa: BLE001
        log.error("session process for %s failed: %r", account.name, e)
    finally:
        os._exit(code)


def _raise_stop(signum, frame):
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)  # one stop is enough; a second must not cut the cleanup short
    raise _Stop()


def _run_session(account, req, policy, child_fds, status_w) -> int:
    """Report "ok PID" or "refused CODE REASON", then "exit STATUS", on the status pipe."""
    pam, pam_env = None, {}
    try:
        if policy.pam.enabled:
            pam = PamTransaction(policy.pam.service, account.name)
            pam.open()
            pam_env = pam.environment()
        devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        plan = {0: child_fds["stdin"], 1: devnull, 2: devnull, **{CHANNEL_FDS[c]: child_fds[c] for c in req.channels}}
        argv = tuple(req.name if a == "{name}" else a for a in policy.uep_argv)
        no_new_privs = policy.pam.no_new_privs or not policy.pam.enabled
        pid, failure = fork_exec(account, argv, build_env(account, policy, pam_env, dict(req.env)), plan,
                                 no_new_privs=no_new_privs, keep_bounding=not no_new_privs and policy.pam.keep_bounding_set)
        for fd in set(plan.values()):
            os.close(fd)
        if failure:
            _report(status_w, "refused " + failure)
        else:
            _report(status_w, f"ok {pid}")
            _report(status_w, f"exit {os.waitstatus_to_exitcode(_wait_uep(pid, policy.stop_grace_seconds))}")
        return 0
    except PamError as e:
        _report(status_w, f"refused pam-{e.step.removeprefix('pam_').replace('_', '-')} PAM service {policy.pam.service!r} refused {account.name!r}: {e}")
        return 0
    except _Stop:
        return 1
    finally:
        if pam is not None:
            try:
                pam.close()
            except PamError as e:
                log.error("closing the PAM session of %s: %s", account.name, e)


def fork_exec(account, argv, env, plan, no_new_privs, keep_bounding=False) -> tuple:
    """Fork, drop to `account`, exec. Returns (pid, None), or (pid, "CODE reason") with the child reaped."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    me = os.getpid()
    # stops wait until _wait_uep, where they TERM the UEP: raised here, one could be lost in
    # an at-fork hook ("Exception ignored") or leave the UEP's pid unknown
    _signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    if (pid := os.fork()) == 0:
        exec_child(account=account, argv=argv, env=env, plan=plan, err_w=err_w, no_new_privs=no_new_privs, parent_pid=me,
                   keep_bounding=keep_bounding)
    os.close(err_w)
    try:  # one read: the child writes its failure in one write of at most 1,000 bytes (atomic on a pipe);
        if failure := os.read(err_r, 4096):  # no file object, whose 8 KiB buffer would be pages of the session process
            os.waitpid(pid, 0)
    finally:
        os.close(err_r)
    return pid, failure.decode("utf-8", "replace") or None


def _wait_uep(pid: int, grace: int) -> int:
    """Wait for the UEP (a stop signal TERMs its group, KILLed after `grace` s), then KILL what it left."""
    deadline = None
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # held since fork_exec
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG if deadline else 0)
            if done:
                break
            if time.monotonic() > deadline:
                kill(-pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.02)
        except _Stop:  # raised once: _raise_stop blocks the stops
            kill(-pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
    _kill_orphans(pid)
    return status


def _kill_orphans(group: int) -> None:
    """KILL and reap the UEP's group and what it left outside it (setsid, double fork): we are its subreaper."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)  # a stop signal now must not leave orphans behind
    while True:
        kill(-group, signal.SIGKILL)
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            pids = [int(p) for p in f.read().split()]
        for p in pids:
            kill(p, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        try:
            os.kill(-group, 0)  # members still dying: what they leave comes to us next round
        except ProcessLookupError:
            if not pids:
                return
        time.sleep(0.01)


def kill(pid: int | None, sig: int) -> None:
    """kill(2) that ignores a pid already gone; a negative pid is a process group."""
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
