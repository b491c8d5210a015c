"""mepctl: the administrator's command line for the multi-user compute endpoint."""

import argparse
import json
import os
import pathlib
import sys

from broker import admin_client, boot, layout
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
        policy = str(layout.policy_file(args.config_root / args.name))
        if not os.path.exists(policy):
            print(f"mepctl start: no endpoint {args.name!r} under {args.config_root} ({policy} is missing); create it "
                  f"with `mepctl configure --multi-user {args.name}`", file=sys.stderr)
            return 78
    else:
        print("mepctl start: name an endpoint (mepctl start NAME) or a policy (--policy FILE)", file=sys.stderr)
        return 64
    # -I keeps the cwd off sys.path, so this finds the installed helper, never a checkout
    # in the current directory; the helper then re-executes itself as `python3 -I -S`
    flags = ["--broker-log-to-console"] * args.log_to_console + ["--broker-debug"] * args.debug
    os.execv(sys.executable, [sys.executable, "-I", "-m", "privhelper", "--policy", policy, "--launch", *flags])


def cmd_configure(args) -> int:
    if not args.multi_user:
        print("mepctl configure: this tool configures multi-user endpoints only; add --multi-user", file=sys.stderr)
        return 64
    from broker import auth_policy
    try:
        new_policy = auth_policy.request_from_flags(args)
    except auth_policy.PolicyError as e:
        print(f"mepctl configure: {e}", file=sys.stderr)
        return 64
    try:
        configure_mod.configure(args.name, args.config_root, display_name=args.display_name,
                                broker_user=args.broker_user, pam=args.pam, pam_service=args.pam_service,
                                high_assurance=args.high_assurance, subscription_id=args.subscription_id,
                                auth_policy=args.auth_policy, audit_log_path=args.audit_log_path,
                                allowed_functions=args.allowed_function, uep_executable=args.uep_executable,
                                contact_email=args.contact_email, from_upstream=args.from_upstream,
                                new_policy=new_policy,
                                files={role: path for role, path in (
                                    ("config", args.core_config or args.manager_config), ("template", args.template_config),
                                    ("schema", args.schema_config), ("user_env", args.user_env_config),
                                    ("idmap", args.id_mapping_config)) if path})  # only the files named
    except (configure_mod.ConfigureError, OSError) as e:
        print(f"mepctl configure: {e}", file=sys.stderr)
        return 1
    return 0


def _socket(args) -> pathlib.Path:
    return args.socket or layout.socket_file(args.config_root.expanduser().resolve() / args.name)


def _json_arg(text: str, what: str):
    """A JSON value given inline, or @FILE."""
    try:
        return json.loads(pathlib.Path(text[1:]).read_text() if text.startswith("@") else text)
    except (OSError, ValueError) as e:
        raise SystemExit(f"mepctl: {what} is not valid JSON ({e}); give a JSON object inline or as @FILE")


def cmd_admin(args) -> int:
    """Every command that asks the running broker something."""
    request = {"op": args.command}
    if args.command == "stop-uep":
        request["uep"] = int(args.uep) if args.uep.isdigit() else args.uep
    if args.command in ("check-idmap", "render-user-config"):
        request["identity"] = _json_arg("@" + args.identity, f"--identity {args.identity}")
    if args.command == "render-user-config":
        request["options"] = _json_arg(args.options, "--options")
        request["runtime"] = _json_arg(args.runtime, "--runtime")
    try:
        reply = admin_client.call(_socket(args), request)
    except admin_client.NotRunning as e:
        root = "" if args.config_root == configure_mod.default_root() else f" --config-root {args.config_root}"
        print(f"mepctl {args.command}: endpoint {args.name!r} is not running: {e}. Start it with "
              f"`mepctl start {args.name}{root}`.", file=sys.stderr)
        return 3
    except (OSError, ValueError) as e:
        print(f"mepctl {args.command}: cannot talk to the broker: ({type(e).__name__}) {e}", file=sys.stderr)
        return 1
    return admin_client.show(args.command, reply, args.json)


def cmd_boot(args) -> int:
    try:
        if args.command == "disable-on-boot":
            print(boot.disable(args.name, args.unit_dir))
            return 0
        if not layout.config_file(args.config_root.expanduser() / args.name).exists():
            raise boot.BootError(f"no endpoint {args.name!r} under {args.config_root}; create it with "
                                 f"`mepctl configure --multi-user {args.name}`")
        try:
            admin_client.call(_socket(args), {"op": "status"}, timeout=5)
            raise boot.BootError(f"endpoint {args.name} is running; stop it first, then enable it on boot "
                                 "(systemd would otherwise start a second one)")
        except admin_client.NotRunning:
            pass
        print(boot.enable(args.name, args.config_root, args.unit_dir, socket_activated=args.socket_activated))
        return 0
    except boot.BootError as e:
        print(f"mepctl {args.command}: {e}", file=sys.stderr)
        return 1


def cmd_login(args) -> int:
    """The seed's interactive login (a UserApp): the broker then registers as this user
    with the tokens it leaves in NAME/run/ (broker/globus_login.py)."""
    from broker import globus_login
    from broker.config import ConfigError, load_config
    if os.geteuid() != 0:
        print("mepctl login: must run as root (the tokens go to the broker account's own directory)", file=sys.stderr)
        return 77
    conf_dir = args.config_root.expanduser().resolve() / args.name
    try:
        config = load_config(conf_dir)
        run = os.stat(layout.run_dir(conf_dir))
    except (ConfigError, OSError) as e:
        print(f"mepctl login: {e}", file=sys.stderr)
        return 78
    try:
        if globus_login.client_credentials(config):
            print(f"mepctl login: note: {args.name} has client credentials ({globus_login.ID_VAR} or "
                  "client_credentials_file); the broker registers with those, not with this login", file=sys.stderr)
        identity = globus_login.login(config, run.st_uid, run.st_gid)
    except Exception as e:  # noqa: BLE001 - globus-sdk raises many kinds; say which
        print(f"mepctl login: the login did not complete: ({type(e).__name__}) {e}", file=sys.stderr)
        return 1
    print(f"Logged in as Globus identity {identity}; the tokens are in {globus_login.token_file(config)} (the broker "
          f"account's, mode 0600). A broker waiting for a login registers at its next attempt; otherwise run "
          f"`mepctl start {args.name}`.")
    return 0


ADMIN_COMMANDS = {
    "status": "show a running endpoint's broker, uptime and counts",
    "list": "list the running user endpoints: user, uid, pid, uptime, user endpoint id",
    "stop-uep": "stop one user endpoint (by its id or pid); the next task for it starts a fresh one",
    "reload": "check the configuration, then re-execute the broker in place (user endpoints keep running)",
    "stop": "stop every user endpoint, then the broker and the helper",
    "check-idmap": "dry run: which identity mapping rule matches an identity set, and which local user it gives",
    "render-user-config": "dry run: the user endpoint configuration the template renders for an identity and "
                          "options, or the exact validation error",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mepctl", description="Administer a privilege-separated multi-user compute endpoint.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    root_help = "where endpoint directories live (default: $GLOBUS_COMPUTE_USER_DIR or /etc/globus-compute)"

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
    conf.add_argument("--auth-policy", help="apply this existing Globus authentication policy (its id)")
    conf.add_argument("--audit-log-path", help="high assurance: where the audit log goes (default NAME/audit.log)")
    conf.add_argument("--allowed-function", action="append", default=[], metavar="FUNCTION_ID",
                      help="only allow this function (repeatable)")
    conf.add_argument("--uep-executable", default=configure_mod.DEFAULT_UEP,
                      help="the globus-compute-endpoint program user endpoints run (default %(default)s)")
    conf.add_argument("--contact-email", help="the administrators' e-mail address (config.yaml `email`)")
    conf.add_argument("--from-upstream", type=pathlib.Path, metavar="DIR",
                      help="convert an existing upstream endpoint directory (e.g. /root/.globus_compute/NAME): keep "
                      "its endpoint id, copy and check its files, print what was kept and what changed")
    files = conf.add_argument_group("configuration file overrides (upstream's flags): copy this file instead of "
                                    "the default (or the one in --from-upstream DIR)")
    for flag, what in (("--core-config", "the multi-user endpoint's config.yaml"),
                       ("--manager-config", "the same as --core-config (upstream's older name)"),
                       ("--template-config", "the user config template (user_config_template.yaml.j2)"),
                       ("--schema-config", "the user config schema (user_config_schema.json)"),
                       ("--user-env-config", "the user environment (user_environment.yaml)"),
                       ("--id-mapping-config", "the identity mapping (identity_mapping_config.json)")):
        files.add_argument(flag, type=pathlib.Path, metavar="FILE", help=what)
    pol = conf.add_argument_group(
        "authentication policy creation (the seed's 'Create a New Authentication Policy')",
        "If any of these is given, configure creates a new Globus Auth policy through globus-sdk (as a client "
        "identity when GLOBUS_COMPUTE_CLIENT_ID and GLOBUS_COMPUTE_CLIENT_SECRET are set, else after you log in) and "
        "writes its id to config.yaml (authentication_policy); users are then evaluated against it at every "
        "submission. Not with --auth-policy.")
    pol.add_argument("--auth-policy-project-id", metavar="PROJECT_ID",
                     help="the Globus Auth project the policy belongs to; if not given, configure lists your "
                     "projects to pick one or creates a new one (on a terminal only)")
    pol.add_argument("--auth-policy-display-name", metavar="NAME",
                     help="a user-friendly name for the policy (default: 'Globus Compute Authentication Policy')")
    pol.add_argument("--auth-policy-description", metavar="TEXT", help="the policy's description")
    pol.add_argument("--allowed-domains", metavar="DOMAINS",
                     help="comma-separated domains whose identities can satisfy the policy, wildcards allowed, e.g. "
                     "'*.edu,globus.org' (domain_constraints_include)")
    pol.add_argument("--excluded-domains", metavar="DOMAINS",
                     help="comma-separated domains whose identities fail the policy, wildcards allowed, e.g. "
                     "'*.edu,globus.org' (domain_constraints_exclude)")
    pol.add_argument("--auth-timeout", type=int, metavar="SECONDS",
                     help="how long ago (seconds) the user's last authentication may be; also makes the policy "
                     "high-assurance (high_assurance: true). The service caches lookups for 60 s, so 60 is the "
                     "smallest timeout that means anything")
    pol.add_argument("--auth-policy-mfa-required", action="store_true",
                     help="require multi-factor authentication (high-assurance policies only)")
    conf.set_defaults(func=cmd_configure)

    start = sub.add_parser("start", help="run the helper as root and the broker as the broker account (foreground)",
                           description="Run the MEP in the foreground: this process becomes the root helper, which "
                           "starts the broker as the broker account.")
    start.add_argument("name", metavar="NAME", nargs="?", help="the endpoint (its directory under the config root)")
    start.add_argument("--config-root", type=pathlib.Path, default=configure_mod.default_root(), help=root_help)
    start.add_argument("--policy", help="run with this helper policy file instead of NAME's")
    start.add_argument("--log-to-console", action="store_true", help="the broker's log lines on the console too "
                       "(they always go to NAME/endpoint.log)")
    start.add_argument("--debug", action="store_true", help="log at debug level")
    start.set_defaults(func=cmd_start)

    login = sub.add_parser("login", help="log in to Globus as yourself, for an endpoint without client credentials "
                           "(as root)", description="Run Globus' login flow (open the URL, paste the code back); the "
                           "broker registers the endpoint with these tokens and renews them itself.")
    login.add_argument("name", metavar="NAME", help="the endpoint")
    login.add_argument("--config-root", type=pathlib.Path, default=configure_mod.default_root(), help=root_help)
    login.set_defaults(func=cmd_login)

    for command, text in ADMIN_COMMANDS.items():
        sp = sub.add_parser(command, help=text, description=text[0].upper() + text[1:] + ". Asks the running "
                            "broker over its admin socket (NAME/run/admin.sock: root and the broker account only).")
        sp.add_argument("name", metavar="NAME", help="the endpoint")
        if command == "stop-uep":
            sp.add_argument("uep", metavar="UEP", help="the user endpoint id or pid (see `mepctl list`)")
        if command in ("check-idmap", "render-user-config"):
            sp.add_argument("--identity", required=True, metavar="FILE",
                            help="a JSON file: one Globus identity ({\"id\", \"username\", ...}) or a list of them")
        if command == "render-user-config":
            sp.add_argument("--options", default="{}", metavar="JSON",
                            help="the user's user_endpoint_config, inline or @FILE (default {})")
            sp.add_argument("--runtime", default="{}", metavar="JSON",
                            help="the SDK's user_runtime, inline or @FILE (default {})")
        sp.add_argument("--config-root", type=pathlib.Path, default=configure_mod.default_root(), help=root_help)
        sp.add_argument("--socket", type=pathlib.Path, help="the admin socket (default NAME/run/admin.sock)")
        sp.add_argument("--json", action="store_true", help="print the broker's reply as JSON")
        sp.set_defaults(func=cmd_admin)

    for command, text in (("enable-on-boot", "install the systemd units that start this endpoint at boot"),
                          ("disable-on-boot", "print how to remove the endpoint's systemd units")):
        sp = sub.add_parser(command, help=text, description=text[0].upper() + text[1:] + ".")
        sp.add_argument("name", metavar="NAME", help="the endpoint")
        sp.add_argument("--config-root", type=pathlib.Path, default=configure_mod.default_root(), help=root_help)
        sp.add_argument("--socket", type=pathlib.Path, help=argparse.SUPPRESS)
        sp.add_argument("--unit-dir", type=pathlib.Path, default=boot.UNIT_DIR, help="where systemd units go "
                        "(default %(default)s)")
        if command == "enable-on-boot":
            sp.add_argument("--socket-activated", action="store_true", help="run the broker as its own sandboxed "
                            "service and the root helper by socket activation (three units) instead of one unit "
                            "whose root process starts the broker")
        sp.set_defaults(func=cmd_boot)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
