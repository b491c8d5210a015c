"""mep-privhelper: the root half of the MEP.

    mep-privhelper --policy FILE --launch            root parent = helper, child = broker
    mep-privhelper --policy FILE --socket-activated  one systemd-accepted connection
    mep-privhelper --policy FILE --fd N              an already-connected socket (tests)
Always runs as `python3 -I -S`; started any other way it re-executes itself so."""

import argparse
import os
import sys

from privhelper import log

EX_USAGE, EX_CONFIG, EX_NOPERM = 64, 78, 77


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="mep-privhelper", description="The root privilege helper of the multi-user "
                                     "compute endpoint. It serves one authenticated broker connection and exits when it ends.")
    parser.add_argument("--policy", required=True, help="root-owned TOML policy file (see docs/policy.md)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--launch", action="store_true", help="start the broker (policy broker_argv) as the broker account and serve it")
    mode.add_argument("--socket-activated", action="store_true", help="serve the connection systemd passed as fd 3 (Accept=yes)")
    mode.add_argument("--fd", type=int, help="serve an already-connected unix socket on this fd")
    parser.add_argument("--broker-log-to-console", action="append_const", const="--log-to-console", dest="broker_flags",
                        default=[], help="with --launch: the broker also logs to the console (mepctl start --log-to-console)")
    parser.add_argument("--broker-debug", action="append_const", const="--debug", dest="broker_flags",
                        help="with --launch: the broker logs at debug level (mepctl start --debug)")
    return parser.parse_args(argv)


BOOT = "import sys; sys.path.insert(0, {code_dir!r}); from privhelper.__main__ import main; sys.exit(main())"


def isolated_argv(python: str, code_dir: str, args: list) -> list:
    """-I: no user site, no PYTHON* variables, no cwd on sys.path; -S: no site-packages
    and no .pth or sitecustomize hooks. The only path added is the helper's own code."""
    return [python, "-I", "-S", "-c", BOOT.format(code_dir=code_dir), *args]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    code_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not (sys.flags.isolated and sys.flags.no_site):
        os.execv(sys.executable, isolated_argv(sys.executable, code_dir, argv))
    args = parse_args(argv)
    if os.geteuid() != 0:
        log.error("must run as root (euid is %d)", os.geteuid())
        return EX_NOPERM
    # imported here so that --help works without the bindings' libraries
    from privhelper import activation, launch, monitor, policy as policy_mod

    try:
        for module in list(sys.modules.values()):  # root runs only code that only root can change
            if module.__name__.split(".")[0] in ("privhelper", "protocol"):
                policy_mod.check_trusted_path(module.__file__, "helper code")
        policy = policy_mod.load_policy(args.policy)
        key = policy_mod.read_key(policy)
    except (policy_mod.PolicyError, OSError) as e:
        log.error("refusing to start: %s", e)
        return EX_CONFIG
    broker_pid = None
    try:
        if args.launch:
            conn, broker_pid = launch.start_broker(policy, tuple(args.broker_flags))
        elif args.socket_activated:
            conn = activation.inherited_connection(policy.broker_uid)
        else:
            conn = activation.unix_stream(args.fd)
    except (activation.ActivationError, launch.LaunchError, OSError) as e:
        log.error("refusing to serve: %s", e)
        return EX_USAGE
    os.closerange(3, conn.fileno())  # nothing inherited survives but stdio and the connection
    os.closerange(conn.fileno() + 1, os.sysconf("SC_OPEN_MAX"))
    log.info("serving broker %s (policy %s, pam %s)", policy.broker_user, policy.path,
             policy.pam.service if policy.pam.enabled else "off")
    return monitor.Monitor(conn, policy, key, broker_pid).run()


if __name__ == "__main__":
    sys.exit(main())
