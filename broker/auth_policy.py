"""`mepctl configure`'s policy creation (the seed's "Create a New Authentication Policy";
upstream's cli.create_or_choose_auth_project and create_auth_policy): a Globus Auth
policy made through globus-sdk's AuthClient, whose id configure writes to config.yaml
as `authentication_policy`.

Who configure is to Globus Auth, as upstream's configure: a client identity when
GLOBUS_COMPUTE_CLIENT_ID and GLOBUS_COMPUTE_CLIENT_SECRET are set (a ClientApp), else
the administrator, who logs in (a UserApp: the seed's "Please authenticate with Globus
here"). The tokens are kept in memory only: the endpoint's own login is `mepctl login`
or its client credentials, and configure leaves no token behind. The Auth service is
the environment's (GLOBUS_SDK_ENVIRONMENT, GLOBUS_SDK_SERVICE_URL_AUTH), as for any
globus-sdk program.
"""

from __future__ import annotations

import os
import sys

import attrs

DEFAULT_DISPLAY_NAME = "Globus Compute Authentication Policy"  # upstream's defaults
DEFAULT_DESCRIPTION = "Authentication Policy for Globus Compute endpoint"


class PolicyError(Exception):
    """The policy could not be made; the message says why and what to pass."""


@attrs.define
class PolicyRequest:
    """What the flags ask for. `auth_timeout` makes the policy high-assurance (the seed:
    "Setting this will also set high_assurance to true"), as Globus Auth requires."""
    project_id: str | None = None
    display_name: str = DEFAULT_DISPLAY_NAME
    description: str = DEFAULT_DESCRIPTION
    allowed_domains: list = attrs.field(factory=list)
    excluded_domains: list = attrs.field(factory=list)
    auth_timeout: int | None = None
    mfa_required: bool = False
    high_assurance: bool = False

    def body(self) -> dict:
        """AuthClient.create_policy's keyword arguments (unset fields: MISSING, not sent)."""
        from globus_sdk import MISSING
        return {"project_id": self.project_id, "display_name": self.display_name, "description": self.description,
                "domain_constraints_include": self.allowed_domains or MISSING,
                "domain_constraints_exclude": self.excluded_domains or MISSING,
                "high_assurance": True if (self.high_assurance or self.auth_timeout is not None) else MISSING,
                "authentication_assurance_timeout": self.auth_timeout if self.auth_timeout is not None else MISSING,
                "required_mfa": True if self.mfa_required else MISSING}


def domains(text: str | None) -> list:
    """"example.edu, *.example.edu" -> ["example.edu", "*.example.edu"]."""
    return [d.strip() for d in (text or "").split(",") if d.strip()]


def request_from_flags(args) -> PolicyRequest | None:
    """A PolicyRequest when any policy-creation flag is given (upstream's rule), else None."""
    wanted = (args.auth_policy_project_id is not None or args.auth_policy_display_name is not None
              or args.auth_policy_description is not None or args.allowed_domains is not None
              or args.excluded_domains is not None or args.auth_timeout is not None or args.auth_policy_mfa_required)
    if not wanted:
        return None
    if args.auth_policy:
        raise PolicyError("--auth-policy names an existing policy; the policy flags (--auth-policy-project-id, "
                          "--allowed-domains, --excluded-domains, --auth-timeout, ...) create a new one: give one or "
                          "the other")
    if args.auth_timeout is not None and args.auth_timeout < 0:
        raise PolicyError(f"--auth-timeout must be a whole number of seconds >= 0, not {args.auth_timeout}")
    if args.auth_policy_mfa_required and not args.high_assurance:
        raise PolicyError("--auth-policy-mfa-required is for high-assurance policies: add --high-assurance")
    return PolicyRequest(project_id=args.auth_policy_project_id,
                         display_name=args.auth_policy_display_name or DEFAULT_DISPLAY_NAME,
                         description=args.auth_policy_description or DEFAULT_DESCRIPTION,
                         allowed_domains=domains(args.allowed_domains), excluded_domains=domains(args.excluded_domains),
                         auth_timeout=args.auth_timeout, mfa_required=args.auth_policy_mfa_required,
                         high_assurance=args.high_assurance)


def auth_client():
    """An AuthClient as configure's caller: a ClientApp with the client credentials of
    the environment, else the administrator's login (UserApp), tokens in memory."""
    import globus_sdk
    from globus_sdk.scopes import AuthScopes
    from globus_sdk.token_storage import MemoryTokenStorage

    from broker import globus_login
    env = os.environ.get("GLOBUS_SDK_ENVIRONMENT") or "production"
    config = globus_sdk.GlobusAppConfig(token_storage=MemoryTokenStorage(), environment=env)
    cid, secret = os.environ.get(globus_login.ID_VAR), os.environ.get(globus_login.SECRET_VAR)
    if cid and secret:
        app = globus_sdk.ClientApp("mepctl configure", client_id=cid, client_secret=secret, config=config)
    elif not sys.stdin.isatty():
        raise PolicyError(f"creating an authentication policy needs a Globus login: set {globus_login.ID_VAR} and "
                          f"{globus_login.SECRET_VAR} (a client identity), or run configure on a terminal to log in")
    else:
        app = globus_sdk.UserApp("mepctl configure", client_id=globus_login.NATIVE_CLIENT_ID, config=config)
    app.add_scope_requirements({AuthScopes.resource_server: [AuthScopes.openid, AuthScopes.manage_projects]})
    return globus_sdk.AuthClient(app=app)


def choose_project(ac, ask=input, say=print) -> str:
    """The seed: "If not provided, the user will be prompted to create one": pick one of
    the caller's projects, or (blank) create a new one. Only on a terminal."""
    if not sys.stdin.isatty():
        raise PolicyError("a new authentication policy belongs to a Globus Auth project: pass "
                          "--auth-policy-project-id PROJECT_ID (or run configure on a terminal to pick or create one)")
    projects = list(ac.get_projects())
    if projects:
        say("Please select a project to contain the new auth policy (leave blank to create a new one):")
        for n, p in enumerate(projects, 1):
            say(f"  {n}. id: {p['id']}, name: {p['display_name']}")
        while True:
            choice = ask(f"Project [1-{len(projects)}, blank for a new one]: ").strip()
            if not choice:
                break
            if choice.isdigit() and 1 <= int(choice) <= len(projects):
                return projects[int(choice) - 1]["id"]
            say(f"  {choice!r} is not one of 1-{len(projects)}")
    say("Creating a new auth project.")
    while True:
        name = ask("Enter a name for this project: ").strip()
        email = ask("Enter the contact email for this project: ").strip()
        admins = domains(ask("Enter a comma separated list of admin IDs for this project: "))
        groups = domains(ask("Enter a comma separated list of group IDs as project admins: "))
        answer = ask("Create this auth project? (Y/y to confirm, Q/q to quit, otherwise start over): ").strip().lower()
        if answer == "q":
            raise PolicyError("canceled: no project, no policy; nothing was configured")
        if answer == "y" and name and email:
            break
    from globus_sdk import MISSING
    r = ac.create_project(name, contact_email=email, admin_ids=admins or MISSING, admin_group_ids=groups or MISSING)
    say(f"Project created: {r['project']['id']}")
    return r["project"]["id"]


def create(req: PolicyRequest, say=print, ac=None) -> str:
    """Make the policy; returns its id."""
    import globus_sdk
    try:
        ac = ac or auth_client()
        if not req.project_id:
            req.project_id = choose_project(ac, say=say)
        r = ac.create_policy(**req.body())
    except globus_sdk.GlobusAPIError as e:
        raise PolicyError(f"Globus Auth refused to create the authentication policy (HTTP {e.http_status} "
                          f"{e.code}: {e.message})") from None
    except globus_sdk.GlobusError as e:
        raise PolicyError(f"could not reach Globus Auth to create the authentication policy: {e}") from None
    policy = r["policy"]
    what = [f"project {policy['project_id']}"]
    if policy.get("domain_constraints_include"):
        what.append(f"allowed domains {', '.join(policy['domain_constraints_include'])}")
    if policy.get("domain_constraints_exclude"):
        what.append(f"excluded domains {', '.join(policy['domain_constraints_exclude'])}")
    if policy.get("authentication_assurance_timeout") is not None:
        what.append(f"authentication within {policy['authentication_assurance_timeout']} s")
    if policy.get("high_assurance"):
        what.append("high assurance")
    say(f"Created authentication policy {policy['id']} ({'; '.join(what)})")
    return policy["id"]
