"""The root-owned TOML policy, the only source of what may be exec'd. Untrusted paths,
unknown keys and wrong types stop the helper: a typo in a security setting must not pass."""

import os
import pwd
import stat
import tomllib
import typing  # tomllib loads it anyway; dataclasses would add inspect and ast (docs/performance.md)

DEFAULT_ENV_DENY = ("LD_*", "PYTHON*", "BASH_FUNC_*", "MALLOC_*", "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES",
                    "BASH_ENV", "ENV", "IFS", "CDPATH", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "NLSPATH",
                    "LOCPATH", "HOSTALIASES", "RESOLV_HOST_CONF", "RES_OPTIONS", "LOCALDOMAIN", "NIS_PATH",
                    "PERL5LIB", "PERLLIB", "PERL5OPT", "RUBYLIB", "RUBYOPT", "NODE_OPTIONS", "JAVA_TOOL_OPTIONS",
                    "_JAVA_OPTIONS")
# set by the helper from the passwd entry; neither PAM nor the broker may replace them
FIXED_ENV = ("HOME", "USER", "LOGNAME", "SHELL")
# all launch mode passes from the helper's environment to the broker, and GLOBUS_SDK_* (docs/policy.md)
BROKER_ENV = frozenset({"HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy", "TERM",
                        "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "GLOBUS_COMPUTE_CLIENT_ID",
                        "GLOBUS_COMPUTE_CLIENT_SECRET"})
NOBODY_UIDS = frozenset({65534, (1 << 32) - 2, (1 << 32) - 1})


class PolicyError(Exception):
    pass


class Pam(typing.NamedTuple):
    enabled: bool = False
    service: str = "globus-compute-endpoint"
    no_new_privs: bool = False  # with PAM on; without PAM it is always set
    keep_bounding_set: bool = True  # with PAM on and no_new_privs off: setuid programs keep their capabilities


class Policy(typing.NamedTuple):
    path: str
    broker_user: str
    broker_uid: int
    key_file: str
    uep_argv: tuple
    broker_argv: tuple = ()
    min_uid: int = 1000
    max_uid: int = (1 << 31) - 1
    deny_users: frozenset = frozenset()
    deny_groups: frozenset = frozenset()
    allow_users: frozenset = frozenset()
    allow_groups: frozenset = frozenset()
    pam: Pam = Pam()
    max_children: int = 256
    max_children_per_user: int = 4
    env_deny: tuple = DEFAULT_ENV_DENY
    env_allow: frozenset = frozenset()  # names the administrator allows despite env_deny (never FIXED_ENV)
    path_env: str = "/usr/local/bin:/usr/bin:/bin"
    lang: str = "C.UTF-8"
    stop_grace_seconds: int = 3
    io_timeout_seconds: int = 10
    max_frame: int = 1 << 20

    def env_denied(self, name: str) -> bool:
        return name not in self.env_allow and any(name.startswith(p[:-1]) if p.endswith("*") else name == p
                                                  for p in self.env_deny)


_INTS = ("min_uid", "max_uid", "max_children", "max_children_per_user", "stop_grace_seconds", "io_timeout_seconds", "max_frame")
_KEYS = {"broker_user": str, "key_file": str, "pam": dict, "path": str, "lang": str, **dict.fromkeys(_INTS, int),
         **dict.fromkeys(("uep_argv", "broker_argv", "deny_users", "deny_groups", "allow_users", "allow_groups", "env_deny",
                         "env_allow"), list)}
_PAM_KEYS = {"enabled": bool, "service": str, "no_new_privs": bool, "keep_bounding_set": bool}
_REQUIRED = ("broker_user", "key_file", "uep_argv")


def check_trusted_path(path: str, what: str, *, want_file: bool = True) -> None:
    """`path`, what it resolves to, and every directory above either must be root-owned and
    not writable by group or others: else a non-root user could swap what root reads or runs."""
    if not os.path.isabs(path):
        raise PolicyError(f"{what} {path!r} is not an absolute path")
    real = os.path.realpath(path)
    for current in dict.fromkeys((os.path.normpath(path), real)):  # the symlink's own directories too
        while True:
            try:
                st = os.lstat(current)
            except OSError as e:
                raise PolicyError(f"{what} {path!r}: cannot stat {current}: {e.strerror}") from None
            if not stat.S_ISLNK(st.st_mode) and st.st_uid != 0:  # a link's own owner and mode mean nothing
                raise PolicyError(f"{what} {path!r}: {current} is owned by uid {st.st_uid}, not root")
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise PolicyError(f"{what} {path!r}: {current} is writable by group or others (mode {stat.filemode(st.st_mode)})")
            if current == real and want_file and not stat.S_ISREG(st.st_mode):
                raise PolicyError(f"{what} {path!r} is not a regular file")
            if current == "/":
                break
            current = os.path.dirname(current)


def _typed(table: dict, spec: dict, where: str) -> dict:
    for key, value in table.items():
        if key not in spec:
            raise PolicyError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(spec))})")
        if type(value) is not spec[key]:
            raise PolicyError(f"{where}: {key} must be a {spec[key].__name__}, not {type(value).__name__}")
    return table


def _str_list(raw: dict, key: str, where: str) -> tuple:
    value = raw.get(key, [])
    if not all(type(v) is str and v for v in value):
        raise PolicyError(f"{where}: {key} must be a list of non-empty strings")
    return tuple(value)


def _argv(raw: dict, key: str, where: str, placeholder: bool) -> tuple:
    if not (argv := _str_list(raw, key, where)):
        if placeholder:
            raise PolicyError(f"{where}: {key} must not be empty")
        return ()
    check_trusted_path(argv[0], f"{where}: {key}[0]")
    if not os.access(argv[0], os.X_OK):
        raise PolicyError(f"{where}: {key}[0] {argv[0]!r} is not executable")
    if placeholder and argv.count("{name}") != 1:
        raise PolicyError(f"{where}: {key} must contain the element \"{{name}}\" exactly once")
    return argv


def load_policy(path: str) -> Policy:
    check_trusted_path(path, "policy file")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{path}: {e}") from None
    if missing := [key for key in _REQUIRED if key not in _typed(raw, _KEYS, path)]:
        raise PolicyError(f"{path}: required key {missing[0]!r} is missing")
    pam = Pam(**_typed(raw.get("pam", {}), _PAM_KEYS, f"{path} [pam]"))
    try:
        broker = pwd.getpwnam(raw["broker_user"])
    except KeyError:
        raise PolicyError(f"{path}: broker_user {raw['broker_user']!r} does not exist") from None
    if broker.pw_uid == 0:
        raise PolicyError(f"{path}: broker_user must not be root")
    check_trusted_path(raw["key_file"], f"{path}: key_file")
    if os.stat(raw["key_file"]).st_mode & stat.S_IROTH:
        raise PolicyError(f"{path}: key_file {raw['key_file']} is readable by others")
    uep_argv = _argv(raw, "uep_argv", path, placeholder=True)
    ints = {k: raw[k] for k in _INTS if k in raw}
    if ints.get("min_uid", 1000) < 1:
        raise PolicyError(f"{path}: min_uid must be at least 1 (uid 0 is never spawned)")
    if not 1 <= ints.get("max_frame", 1 << 20) <= 1 << 20:
        raise PolicyError(f"{path}: max_frame must be in 1..1048576")
    for key in ("max_children", "max_children_per_user", "stop_grace_seconds", "io_timeout_seconds"):
        if ints.get(key, 1) < 1:
            raise PolicyError(f"{path}: {key} must be at least 1")
    lists = {k: frozenset(_str_list(raw, k, path)) for k in ("deny_users", "deny_groups", "allow_users", "allow_groups", "env_allow")}
    if fixed := sorted(lists["env_allow"] & set(FIXED_ENV)):
        raise PolicyError(f"{path}: env_allow may not name {fixed[0]}: the helper sets it from the passwd entry")
    return Policy(path=path, broker_user=broker.pw_name, broker_uid=broker.pw_uid,
                  key_file=raw["key_file"], uep_argv=uep_argv, broker_argv=_argv(raw, "broker_argv", path, placeholder=False),
                  pam=pam, env_deny=DEFAULT_ENV_DENY + _str_list(raw, "env_deny", path),
                  path_env=raw.get("path", Policy._field_defaults["path_env"]),
                  lang=raw.get("lang", Policy._field_defaults["lang"]), **lists, **ints)


def read_key(policy: Policy) -> bytes:
    with open(policy.key_file, "rb") as f:
        key = f.read(64)
    if len(key) != 32:
        raise PolicyError(f"key_file {policy.key_file} must hold exactly 32 bytes, has {len(key)}")
    return key
