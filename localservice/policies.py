"""Globus Auth projects and authentication policies, in small: the routes globus-sdk's
AuthClient calls (create_project, get_projects, create_policy, get_policy, get_policies),
and the evaluation the Compute service asks Auth for when a user reaches an endpoint
that names a policy.

A policy is satisfied by an identity set when one of its identities
  - is from a domain of `domain_constraints_include` (if the list is given; `*`
    wildcards, as fnmatch), and
  - is from no domain of `domain_constraints_exclude`, and
  - (`authentication_assurance_timeout`) authenticated at most that many seconds ago.
An identity's domain is the part of its username after the last "@"; its last
authentication is its `last_authentication` (epoch seconds) in the identities file,
else the time its token was issued (a login), else the time the service started.

What Globus Auth does that this does not: MFA (`required_mfa` is stored, not checked),
sessions that a login "boosts" (here the identities file stands for them), project
admins and groups (every caller may read and use every project and policy), and the
60 s cache of lookups the seed mentions (evaluation is fresh at every request).
"""

from __future__ import annotations

import fnmatch
import time
import uuid

import attrs

from localservice.auth import AuthError

POLICY_FIELDS = ("project_id", "high_assurance", "authentication_assurance_timeout", "required_mfa", "display_name",
                 "description", "domain_constraints_include", "domain_constraints_exclude")


@attrs.define
class Refusal:
    """Why an identity set does not satisfy a policy: one line per identity."""
    policy: dict
    reasons: list

    def message(self) -> str:
        name = self.policy.get("display_name") or self.policy["id"]
        return (f"Your identities do not satisfy the authentication policy {self.policy['id']} ({name}) of this "
                f"endpoint: " + "; ".join(self.reasons))


def domain(identity: dict) -> str:
    return (identity.get("username") or "").rpartition("@")[2].lower()


def _matches(dom: str, patterns) -> str | None:
    for pattern in patterns or ():
        if fnmatch.fnmatchcase(dom, pattern.strip().lower()):
            return pattern.strip()
    return None


class Policies:
    def __init__(self):
        self.projects: dict[str, dict] = {}
        self.policies: dict[str, dict] = {}
        self.started = time.time()

    # -- projects ------------------------------------------------------------------

    def create_project(self, caller: dict, body: dict) -> dict:
        doc = body.get("project") if isinstance(body, dict) else None
        if not isinstance(doc, dict) or not doc.get("display_name") or not doc.get("contact_email"):
            raise AuthError(400, "BAD_REQUEST", "a project needs display_name and contact_email")
        project = {"id": str(uuid.uuid4()), "display_name": doc["display_name"], "contact_email": doc["contact_email"],
                   "admin_ids": list(doc.get("admin_ids") or [caller["id"]]),
                   "admin_group_ids": list(doc.get("admin_group_ids") or []), "project_name": doc["display_name"],
                   "admins": {"identities": [], "groups": []}}
        self.projects[project["id"]] = project
        return {"project": project}

    def get_projects(self) -> dict:
        return {"projects": list(self.projects.values())}

    # -- policies ------------------------------------------------------------------

    def create_policy(self, caller: dict, body: dict) -> dict:
        doc = body.get("policy") if isinstance(body, dict) else None
        if not isinstance(doc, dict):
            raise AuthError(400, "BAD_REQUEST", 'expected {"policy": {...}}')
        if doc.get("project_id") not in self.projects:
            raise AuthError(404, "NOT_FOUND", f"project {doc.get('project_id')!r} not found")
        if not doc.get("display_name") or not isinstance(doc.get("description"), str):
            raise AuthError(400, "BAD_REQUEST", "a policy needs display_name and description")
        for key in ("domain_constraints_include", "domain_constraints_exclude"):
            value = doc.get(key)
            if value is not None and not (isinstance(value, list) and all(isinstance(d, str) for d in value)):
                raise AuthError(400, "BAD_REQUEST", f"{key} must be a list of domains")
        timeout = doc.get("authentication_assurance_timeout")
        if timeout is not None and (not isinstance(timeout, int) or timeout < 0):
            raise AuthError(400, "BAD_REQUEST", "authentication_assurance_timeout must be a whole number of seconds")
        if not doc.get("high_assurance") and (timeout is not None or doc.get("required_mfa")):
            # Globus Auth: these two are high-assurance fields
            raise AuthError(400, "BAD_REQUEST", "authentication_assurance_timeout and required_mfa need "
                            "high_assurance: true")
        policy = {"id": str(uuid.uuid4()), **{k: doc.get(k) for k in POLICY_FIELDS}}
        policy["high_assurance"] = bool(policy["high_assurance"])
        policy["required_mfa"] = bool(policy["required_mfa"])
        self.policies[policy["id"]] = policy
        return {"policy": policy}

    def get_policy(self, policy_id: str) -> dict:
        return {"policy": self.policy(policy_id)}

    def get_policies(self) -> dict:
        return {"policies": list(self.policies.values())}

    def policy(self, policy_id: str) -> dict:
        try:
            return self.policies[str(uuid.UUID(str(policy_id)))]
        except (KeyError, ValueError):
            raise AuthError(404, "NOT_FOUND", f"policy {policy_id} not found") from None

    # -- evaluation ----------------------------------------------------------------

    def evaluate(self, policy_id: str, identity_set: list, authenticated_at: dict | None = None,
                 now: float | None = None) -> Refusal | None:
        """None when one identity satisfies the policy, else why each one does not.
        `authenticated_at`: identity id -> when its token was issued (a login)."""
        policy = self.policy(policy_id)
        now = time.time() if now is None else now
        reasons = []
        for ident in identity_set:
            dom, name = domain(ident), ident.get("username") or ident["id"]
            include, exclude = policy.get("domain_constraints_include"), policy.get("domain_constraints_exclude")
            if include and not _matches(dom, include):
                reasons.append(f"{name} is not from an allowed domain (domain_constraints_include: "
                               f"{', '.join(include)})")
                continue
            if hit := _matches(dom, exclude):
                reasons.append(f"{name} is from an excluded domain ({hit}; domain_constraints_exclude: "
                               f"{', '.join(exclude)})")
                continue
            timeout = policy.get("authentication_assurance_timeout")
            if timeout is not None:
                last = ident.get("last_authentication", (authenticated_at or {}).get(ident["id"], self.started))
                age = now - float(last)
                if age > timeout:
                    reasons.append(f"{name} last authenticated {int(age)} s ago, more than the "
                                   f"authentication_assurance_timeout of {timeout} s: log in again")
                    continue
            return None
        return Refusal(policy, reasons or ["no identity"])
