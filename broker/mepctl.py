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
    # -I keeps the cwd off sys.path, so this finds the installed helper, never a checkout
    # in the current directory; the helper then re-executes itself as `python3 -I -S`
    argv = [sys.executable, "-I", "-m", "privhelper", "--policy", args.policy, "--launch"]
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
