"""Message types with exact wire schemas: the exact key set, every value checked and
bounded, bool never an int, names that cannot hold '/', '..', NUL or a leading '-'."""

import base64
import binascii
import collections
import re
import types

from protocol.errors import ProtocolError
from protocol.framing import MAX_FRAME

VERSION = 1

USERNAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
UEP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
REQ_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
CODE_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
HEX64_RE = re.compile(r"[0-9a-f]{64}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TITLE_NAME_RE = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no space: what `ps` shows untouched

MAX_ENV_VARS = 64
MAX_ENV_VALUE = 4096
MAX_STDIN = 512 * 1024
MAX_REASON = 1024
SIGNALS = frozenset({"TERM", "INT", "KILL", "HUP"})
CHANNELS = ("cred", "audit")  # fixed order: also the order of fds sent with `spawned`
CHANNEL_FDS = {"cred": 3, "audit": 4}  # the UEP's fd for each: the helper installs it, the broker names it in stdin
MAX_PID = 1 << 22  # Linux pid_max ceiling


class Int:
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def check(self, name, value):
        if type(value) is not int:  # rejects bool, which is an int subclass
            raise ProtocolError(f"{name}: expected an integer, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise ProtocolError(f"{name}: {value} is outside {self.lo}..{self.hi}")
        return value


class Str:
    def __init__(self, regex=None, max_len=256, choices=None, no_dotdot=False):
        self.regex, self.max_len, self.choices, self.no_dotdot = regex, max_len, choices, no_dotdot

    def check(self, name, value):
        if type(value) is not str:
            raise ProtocolError(f"{name}: expected a string, got {type(value).__name__}")
        problem = (f"is longer than {self.max_len} characters" if len(value) > self.max_len else
                   "contains NUL" if "\x00" in value else
                   f"{value[:80]!r} does not match {self.regex.pattern}" if self.regex and not self.regex.fullmatch(value) else
                   f"{value[:80]!r} is not one of {sorted(self.choices)}" if self.choices and value not in self.choices else
                   "contains '..'" if self.no_dotdot and ".." in value else None)
        if problem:  # a sentence after the field's name: the broker shows it to the user as it is
            raise ProtocolError(f"{name} {problem}")
        return value


class Env:
    def check(self, name, value):
        if type(value) is not dict or len(value) > MAX_ENV_VARS:
            raise ProtocolError(f"{name}: expected an object of at most {MAX_ENV_VARS} variables")
        for k, v in value.items():
            ENV_NAME.check(f"{name} key", k)
            ENV_VALUE.check(f"{name}[{k}]", v)
        return types.MappingProxyType(dict(value))


# the fields whose values come from users and the admin's files: the broker checks them
# with these same objects where each value enters (broker/limits.py)
USERNAME = Str(USERNAME_RE, 32, no_dotdot=True)
ENV_NAME, ENV_VALUE = Str(ENV_NAME_RE, 64), Str(None, MAX_ENV_VALUE)


class Channels:
    def check(self, name, value):
        if type(value) is not list or value != [c for c in CHANNELS if c in value] or len(set(value)) != len(value):
            raise ProtocolError(f"{name}: must be a sorted, duplicate-free subset of {list(CHANNELS)}")
        return tuple(value)


class Base64:
    def __init__(self, max_bytes):
        self.max_bytes = max_bytes

    def check(self, name, value):
        Str(None, (self.max_bytes + 2) // 3 * 4).check(name, value)
        try:
            raw = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeError):
            raise ProtocolError(f"{name}: not valid base64") from None
        if base64.b64encode(raw).decode("ascii") != value:
            raise ProtocolError(f"{name}: base64 is not canonical")
        if len(raw) > self.max_bytes:  # the text's cap above lets up to 2 bytes more through
            raise ProtocolError(f"{name} is {len(raw)} bytes, more than {self.max_bytes}")
        return raw


def _wire(value):
    """A field value in its JSON shape: base64 for bytes, dict, list."""
    return (base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else dict(value)
            if isinstance(value, types.MappingProxyType) else list(value) if isinstance(value, tuple) else value)


REGISTRY = {}


def _same(a, b) -> bool:
    return type(a) is type(b) and tuple.__eq__(a, b)


def message(type_name, *, request=False, doc=None, **fields):
    """Declare an immutable message class (a named tuple equal only to its own type): its
    wire name, whether it is a MAC'd request, and its fields with their validators (the
    exact key set on the wire)."""
    cls = type(type_name.title(), (collections.namedtuple(type_name.title(), list(fields)),), {
        "__slots__": (), "__doc__": doc, "__eq__": _same, "__ne__": lambda a, b: not _same(a, b),
        "__hash__": tuple.__hash__, "TYPE": type_name, "FIELDS": fields, "REQUEST": request})
    REGISTRY[type_name] = cls
    return cls


def to_wire(msg) -> dict:
    return {**{name: _wire(getattr(msg, name)) for name in msg.FIELDS}, "type": msg.TYPE}


def from_wire(obj, envelope=()) -> object:
    """Validate a decoded body against its type's schema; `envelope` names extra keys
    (seq, mac) that the session layer has already checked and removes here."""
    if type(obj) is not dict:
        raise ProtocolError("message is not an object")
    type_name = obj.get("type")
    cls = REGISTRY.get(type_name) if type(type_name) is str else None
    if cls is None:
        raise ProtocolError(f"unknown message type {str(type_name)[:40]!r}")
    if (keys := set(obj)) != (expected := {*cls.FIELDS, "type", *envelope}):
        raise ProtocolError(f"{type_name}: missing keys {sorted(expected - keys)}, unexpected keys {sorted(keys - expected)}")
    return cls(**{name: field.check(f"{type_name}.{name}", obj[name]) for name, field in cls.FIELDS.items()})


REQ, PID = Str(REQ_ID_RE, 64), Int(1, MAX_PID)
Challenge = message("challenge", version=Int(VERSION, VERSION), nonce=Str(HEX64_RE, 64), max_frame=Int(1, MAX_FRAME),
                    pam=Str(None, 128), doc="`max_frame`: the policy's frame cap, so that the broker never sends a frame "
                    "the helper must refuse; `pam`: the policy's PAM service, or empty when PAM is off.")
Hello = message("hello", version=Int(VERSION, VERSION), mac=Str(HEX64_RE, 64))
# requests, broker -> helper; on the wire each also carries seq and mac
Spawn = message("spawn", request=True, req=REQ, username=USERNAME, uid=Int(0, (1 << 32) - 1),
                name=Str(UEP_NAME_RE, 128, no_dotdot=True), env=Env(), stdin=Base64(MAX_STDIN), channels=Channels())
Signal = message("signal", request=True, req=REQ, pid=PID, signal=Str(choices=SIGNALS))
Ping = message("ping", request=True, req=REQ)
Title = message("title", request=True, req=REQ, endpoint_id=Str(UUID_RE, 36), name=Str(TITLE_NAME_RE, 128),
                doc="The helper's process title names the MEP, as the seed's `ps` recipe expects; answered with pong.")
# replies and events, helper -> broker
Spawned = message("spawned", req=REQ, pid=PID, channels=Channels(),
                  doc="The UEP has exec'd; the broker's ends of `channels` come with this frame (SCM_RIGHTS, CHANNELS order).")
Refused = message("refused", req=REQ, code=Str(CODE_RE, 32), reason=Str(None, MAX_REASON))
Signaled = message("signaled", req=REQ, pid=PID)
Exited = message("exited", pid=PID, status=Int(-64, 255), doc="`status`: the UEP's exit code, or minus the signal that killed it.")
Pong = message("pong", req=REQ)

HELPER_EVENTS = (Spawned, Refused, Signaled, Exited, Pong)
