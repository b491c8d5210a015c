"""ctypes for what the stdlib lacks (prctl, capset): no third-party compiled code in the
root process. Why not python-prctl or cffi: docs/decisions.md."""

import ctypes
import os

_libc = ctypes.CDLL("libc.so.6", use_errno=True)

PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER = 1, 8, 24, 36
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 39, 47, 4

_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def prctl(option: int, arg2: int = 0) -> int:
    """The message is made only on failure: each object a forked session process makes costs it a page."""
    if (result := _libc.prctl(option, arg2, 0, 0, 0)) < 0:
        _check(result, f"prctl({option}, {arg2})")
    return result


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData * 2)]
_libc.capset.restype = ctypes.c_int


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets of this process."""
    _check(_libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), ctypes.byref((_CapData * 2)())), "capset")


with open("/proc/sys/kernel/cap_last_cap") as _f:  # read once, not in each forked child
    LAST_CAP = int(_f.read())


def drop_bounding_set() -> None:
    """Drop every capability from the bounding set (needs CAP_SETPCAP: call as root). Every
    cap up to cap_last_cap is one this kernel knows, so any error is a real one."""
    for cap in range(LAST_CAP + 1):
        prctl(PR_CAPBSET_DROP, cap)


def proc_status() -> dict:
    """This process's /proc/self/status as a dict of strings."""
    with open("/proc/self/status", "rb") as f:  # bytes: a text file's decoder costs a forked child 0.1 ms
        return dict(line.decode().split(":\t", 1) for line in f.read().splitlines() if b":\t" in line)


def _argv_area() -> tuple:
    """The kernel's arg_start and arg_end (/proc/self/stat fields 48 and 49), read once: a
    forked session process has the same area, and reading the file there costs it ~60 pages."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": field 3 is at index 0
    return int(fields[45]), int(fields[46])


_ARGV_START, _ARGV_END = _argv_area()


def set_title(title: str) -> None:
    """Write `title` over this process's argv area, which /proc/PID/cmdline (ps, pstree)
    shows: the seed finds the MEP by its title. Python keeps its own copy of argv, so
    nothing reads the old bytes again."""
    size = _ARGV_END - _ARGV_START
    ctypes.memmove(_ARGV_START, title.encode()[:size - 1].ljust(size, b"\0"), size)
