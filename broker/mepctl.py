"""mepctl: the administrator's command line for the multi-user compute endpoint."""

import argparse
import os
import sys


def cmd_start(args) -> int:
    """Become the helper (root); the helper starts the broker as the broker account."""
    if os.geteuid() != 0:
        print("mepctl start: must run as root (the helper keeps root; it drops the broker to the "
              "broker account itself)", file=sys.stderr)
        return 77
    # the helper re-executes itself as `python3 -I -S` with only its own code on sys.path
    argv = [sys.executable, "-m", "privhelper", "--policy", args.policy, "--launch"]
    if args.debug:
        argv.append("--debug")
    os.execv(sys.executable, argv)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mepctl", description="Administer a privilege-separated multi-user compute endpoint.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start = sub.add_parser("start", help="run the helper as root and the broker as the broker account (foreground)",
                           description="Run the MEP in the foreground: this process becomes the root helper, which "
                           "starts the broker program named in the policy as the broker account.")
    start.add_argument("--policy", required=True, help="the helper policy file (root-owned TOML)")
    start.add_argument("--debug", action="store_true", help="more helper logging")
    start.set_defaults(func=cmd_start)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
