"""mepctl: the administrator's command line for the multi-user compute endpoint."""

import argparse
import os
import pathlib
import sys

from broker import configure as configure_mod


def cmd_start(args) -> int:
    """Become the helper (root); the helper starts the broker as the broker account."""
    if os.geteuid() != 0:
        print("mepctl start: must run as root (the helper keeps root; it drops the broker to the "
              "broker account itself)", file=sys.stderr)
        return 77
    if args.policy:
        policy = args.policy
    elif args.name:
        policy = str(args.config_root / args.name / configure_mod.POLICY_FILE)
        if not os.path.exists(policy):
            print(f"mepctl start: no endpoint {args.name!r} under {args.config_root} ({policy} is missing); create it "
                  f"with `mepctl configure --multi-user {args.name}`", file=sys.stderr)
            return 78
    else:
        print("mepctl start: name an endpoint (mepctl start NAME) or a policy (--policy FILE)", file=sys.stderr)
        return 64
    # -I keeps the cwd off sys.path, so this finds the installed helper, never a checkout
    # in the current directory; the helper then re-executes itself as `python3 -I -S`
    argv = [sys.executable, "-I", "-m", "privhelper", "--policy", policy, "--launch"]
    if args.debug:
        argv.append("--debug")
    os.execv(sys.executable, argv)


def cmd_configure(args) -> int:
    if not args.multi_user:
        print("mepctl configure: this tool configures multi-user endpoints only; add --multi-user", file=sys.stderr)
        return 64
    try:
        configure_mod.configure(args.name, args.config_root, display_name=args.display_name,
                                broker_user=args.broker_user, pam=args.pam, pam_service=args.pam_service,
                                high_assurance=args.high_assurance, subscription_id=args.subscription_id,
                                auth_policy=args.auth_policy, audit_log_path=args.audit_log_path,
                                allowed_functions=args.allowed_function, uep_executable=args.uep_executable)
    except (configure_mod.ConfigureError, OSError) as e:
        print(f"mepctl configure: {e}", file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mepctl", description="Administer a privilege-separated multi-user compute endpoint.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    root_help = "where endpoint directories live (default: $GLOBUS_COMPUTE_USER_DIR or ~/.globus_compute)"

    conf = sub.add_parser("configure", help="create a new multi-user endpoint's configuration (as root)",
                          description="Write NAME's directory: config.yaml, the identity mapping example, the user "
                          "config template and schema, user_environment.yaml, the root helper's policy and its key.")
    conf.add_argument("name", metavar="NAME")
    conf.add_argument("--multi-user", action="store_true", help="required: this endpoint maps users")
    conf.add_argument("--config-root", type=pathlib.Path, default=configure_mod.default_root(), help=root_help)
    conf.add_argument("--display-name", help="the name users see in the web app")
    conf.add_argument("--broker-user", default=configure_mod.DEFAULT_BROKER,
                      help="the unprivileged account the broker runs as (created if missing; default %(default)s)")
    conf.add_argument("--pam", action="store_true", help="run PAM account and session checks for every user endpoint")
    conf.add_argument("--pam-service", default="globus-compute-endpoint", help="the PAM service name (default %(default)s)")
    conf.add_argument("--high-assurance", action="store_true", help="a high-assurance endpoint (fixed at registration)")
    conf.add_argument("--subscription-id", help="the Globus subscription (required for high assurance)")
    conf.add_argument("--auth-policy", help="a Globus authentication policy id")
    conf.add_argument("--audit-log-path", help="high assurance: where the audit log goes (default NAME/audit.log)")
    conf.add_argument("--allowed-function", action="append", default=[], metavar="FUNCTION_ID",
                      help="only allow this function (repeatable)")
    conf.add_argument("--uep-executable", default=configure_mod.DEFAULT_UEP,
                      help="the globus-compute-endpoint program user endpoints run (default %(default)s)")
    conf.set_defaults(func=cmd_configure)

    start = sub.add_parser("start", help="run the helper as root and the broker as the broker account (foreground)",
                           description="Run the MEP in the foreground: this process becomes the root helper, which "
                           "starts the broker as the broker account.")
    start.add_argument("name", metavar="NAME", nargs="?", help="the endpoint (its directory under the config root)")
    start.add_argument("--config-root", type=pathlib.Path, default=configure_mod.default_root(), help=root_help)
    start.add_argument("--policy", help="run with this helper policy file instead of NAME's")
    start.add_argument("--debug", action="store_true", help="more helper logging")
    start.set_defaults(func=cmd_start)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
