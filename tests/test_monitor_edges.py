"""privhelper.monitor's channel plumbing and linux.set_title, called directly on the real
kernel (memfds, seals, pipes, /proc): no helper, no test users, no lock. What the UEP
receives is checked through the real helper in tests/test_channel.py and test_child.py;
these pin the properties those tests cannot see from the UEP's side (seals, flags, modes,
which fds the helper keeps). Root only because the rest of the fast tier is."""

import ctypes
import fcntl
import os
import resource
import signal
import stat

import pytest

from privhelper import linux, monitor
from protocol.messages import Spawn

ALL_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def spawn(stdin=b"the config", channels=("cred", "audit")):
    return Spawn("r1", "mept-alice", 1001, "uep1", {}, stdin, channels)


def open_fds() -> set:
    def is_open(fd):
        try:
            return fcntl.fcntl(fd, fcntl.F_GETFD) >= 0
        except OSError:  # the listing's own directory fd, closed by now
            return False
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if is_open(fd)}


@pytest.fixture
def channels():
    made = []

    def make(msg):
        child_fds, broker_fds = {}, []
        before = open_fds()
        monitor.make_channels(msg, child_fds, broker_fds)
        made.extend([*child_fds.values(), *broker_fds])
        return child_fds, broker_fds, open_fds() - before

    yield make
    for fd in made:
        os.close(fd)


def test_stdin_is_a_sealed_read_only_memfd(channels):
    child_fds, broker_fds, new = channels(spawn(channels=()))
    assert broker_fds == [] and set(child_fds) == {"stdin"}
    fd = child_fds["stdin"]
    assert new == {fd}, "the helper's own writable stdin memfd must be closed once the UEP's end exists"
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == ALL_SEALS  # nobody, not even the helper, can change it now
    assert os.pread(fd, 100, 0) == b"the config"
    assert os.readlink(f"/proc/self/fd/{fd}") == "/memfd:mep-stdin (deleted)"  # what an admin sees in ls -l /proc/PID/fd
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # placed by the session process, never inherited by accident
    assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o400  # no reopen for writing through /proc
    with pytest.raises(OSError):
        os.write(fd, b"x")


def test_empty_and_large_stdin(channels):
    child_fds, _, _ = channels(spawn(stdin=b""))
    assert os.pread(child_fds["stdin"], 10, 0) == b""
    big = os.urandom(512 * 1024)
    child_fds, _, _ = channels(spawn(stdin=big))
    assert os.pread(child_fds["stdin"], len(big) + 1, 0) == big


def test_a_short_write_of_stdin_is_an_error_not_a_truncated_config():
    """RLIMIT_FSIZE (with SIGXFSZ ignored) makes the kernel write only part of stdin: the
    UEP must not start on a truncated config. In a forked child, so the limit stays there."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (10, resource.RLIM_INFINITY))
            try:
                monitor.make_channels(spawn(stdin=b"x" * 100), {}, [])
                os.write(w, b"no error")
            except OSError as e:
                os.write(w, str(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    said = os.read(r, 1000).decode()
    os.waitpid(pid, 0)
    os.close(r)
    assert said == "short write of the UEP's stdin (100 bytes)"


def test_cred_memfd_the_broker_writes_and_the_uep_reads(channels):
    child_fds, broker_fds, new = channels(spawn(channels=("cred",)))
    assert set(child_fds) == {"stdin", "cred"} and len(broker_fds) == 1
    assert new == {child_fds["stdin"], child_fds["cred"], broker_fds[0]}
    broker, uep = broker_fds[0], child_fds["cred"]
    assert fcntl.fcntl(broker, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # the helper's end reaches no child
    assert fcntl.fcntl(uep, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    assert fcntl.fcntl(uep, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert stat.S_IMODE(os.fstat(uep).st_mode) == 0o400
    assert fcntl.fcntl(broker, fcntl.F_GET_SEALS) == fcntl.F_SEAL_SEAL  # never sealable: the broker rewrites it
    assert os.readlink(f"/proc/self/fd/{broker}") == os.readlink(f"/proc/self/fd/{uep}") == "/memfd:mep-cred (deleted)"
    os.pwrite(broker, b"token", 0)
    assert os.pread(uep, 100, 0) == b"token"
    with pytest.raises(OSError):
        os.write(uep, b"x")


def test_audit_is_a_packet_pipe_from_the_uep_to_the_broker(channels):
    child_fds, broker_fds, _ = channels(spawn(channels=("audit",)))
    assert set(child_fds) == {"stdin", "audit"} and len(broker_fds) == 1
    reader, writer = broker_fds[0], child_fds["audit"]
    assert fcntl.fcntl(writer, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
    assert fcntl.fcntl(reader, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    for fd in (reader, writer):
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    os.write(writer, b"record one")
    os.write(writer, b"record two")
    assert os.read(reader, 65536) == b"record one"  # one record per read
    assert os.read(reader, 65536) == b"record two"


def test_both_channels_in_order(channels):
    child_fds, broker_fds, _ = channels(spawn())
    assert set(child_fds) == {"stdin", "cred", "audit"}
    assert len(broker_fds) == 2
    assert fcntl.fcntl(broker_fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR  # cred first, as Spawned lists them
    assert fcntl.fcntl(broker_fds[1], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY


def test_describe_names_a_signal_or_an_exit_code():
    for action, expect in ((lambda: os._exit(7), "exit code 7"), (lambda: os.kill(os.getpid(), signal.SIGKILL),
                                                                   "killed by signal 9")):
        pid = os.fork()
        if pid == 0:
            action()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert monitor._describe(status) == expect


def title_seen(title: str, comm: bytes = b"") -> bytes:
    """/proc/PID/cmdline of a forked child that has set `title` (this test's own argv stays);
    `comm`: the child's name first (prctl PR_SET_NAME), which /proc/PID/stat shows in parentheses."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.close(go_w)
            if comm:
                ctypes.CDLL(None).prctl(15, ctypes.c_char_p(comm), 0, 0, 0)
            linux.set_title(title)
            os.write(w, b"x")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    try:
        assert os.read(r, 1) == b"x", "set_title failed in the child"
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    finally:
        os.close(go_w)
        os.waitpid(pid, 0)
        os.close(r)


def argv_area() -> int:
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[46]) - int(fields[45])


def test_set_title_replaces_the_whole_argv_area():
    title = "Globus Compute Endpoint *(0000, mep) [root helper]"
    seen = title_seen(title)
    assert len(seen) == argv_area()  # the whole area, no byte of the old argv left
    assert seen.rstrip(b"\0") == title.encode() and seen.endswith(b"\0")


def test_set_title_with_parentheses_and_spaces_in_the_process_name():
    """/proc/PID/stat's fields are counted after the *last* `)`: a name may hold one."""
    assert title_seen("the title", comm=b"a) 1 2 (3)").rstrip(b"\0") == b"the title"


def test_set_title_is_cut_to_the_area_and_keeps_a_final_nul():
    area = argv_area()
    seen = title_seen("t" * (area + 50))
    assert seen == b"t" * (area - 1) + b"\0"
