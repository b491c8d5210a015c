"""The seed's "Authentication Policies" and "High-Assurance" sections, run as written
against the local service (its Globus Auth projects and policies, localservice/policies.py)
with the real globus-sdk and globus-compute-sdk: configure creates a policy through
AuthClient and applies it; the service evaluates it at every submission (an allowed, an
excluded and a stale-authentication user); a high-assurance function runs only on its HA
endpoint, its result is fetched through the API with the policy checked again, and the HA
endpoint's audit log records its task. globus-sdk is pointed at the stand-in as a user
selects a non-production Auth (GLOBUS_SDK_SERVICE_URL_AUTH), never patched."""

import json
import os
import select
import subprocess
import time
import urllib.request

import pytest
import yaml

from tests.rigs import procs
from tests.rigs.procs import wait_for
from tests.rigs.service import LocalService, live_mep, run_sdk

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_strays", "rabbitmq")]
MEPCTL = ["/opt/mep/venv/bin/python3", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
          "from broker.mepctl import main; sys.exit(main())"]
USERS = ("mept-alice@example.org", "mept-bob@example.org", "mallory@bad.example.org", "eve@elsewhere.org",
         "admin@example.org")
SUBSCRIPTION = "00000000-1111-2222-3333-44444444ffff"
WHOAMI = """
def whoami(x):
    import os, pwd
    return {"user": pwd.getpwuid(os.getuid()).pw_name, "x": x * 2}
"""
# the seed's HA function, as written
HA_FUNC = """
def ha_func(pii: str):
   from datetime import datetime
   return f"ha_func: {datetime.now()} - processed pii: {pii}"
"""


@pytest.fixture
def service(rigdir):
    svc = LocalService(rigdir, users=USERS)
    yield svc
    svc.stop()


@pytest.fixture
def croot(rigdir):
    path = rigdir.path / f"conf-{os.urandom(3).hex()}"
    yield path
    procs.run("rm", "-rf", str(path))


def post(service, path: str, body: dict, user: str = "admin@example.org") -> dict:
    request = urllib.request.Request(service.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {service.tokens[user]}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def project(service) -> str:
    return post(service, "/v2/api/projects", {"project": {"display_name": "MEP tests",
                                                          "contact_email": "admin@example.org"}})["project"]["id"]


def policy(service, **fields) -> str:
    body = {"project_id": project(service), "display_name": "test policy", "description": "", **fields}
    return post(service, "/v2/api/policies", {"policy": body})["policy"]["id"]


def configure(rigdir, service, croot, *args, stdin=subprocess.DEVNULL, **kw):
    """`mepctl configure ...` as an administrator with a client identity of the service's
    Auth (upstream's variables), Auth selected as a user selects a non-production one."""
    client_id, secret = service.add_client()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(croot.parent), "GLOBUS_COMPUTE_CLIENT_ID": client_id,
           "GLOBUS_COMPUTE_CLIENT_SECRET": secret, "GLOBUS_SDK_SERVICE_URL_AUTH": service.url + "/"}
    return subprocess.run([*MEPCTL, str(rigdir.lib), "configure", *args, "--config-root", str(croot),
                           "--broker-user", rigdir.accounts.broker.pw_name, "--uep-executable", str(rigdir.probe)],
                          capture_output=True, text=True, env={**env, **kw.pop("env", {})}, stdin=stdin, timeout=60)


def config_yaml(croot, name) -> dict:
    return yaml.safe_load((croot / name / "config.yaml").read_text())


# -- Create a New Authentication Policy ------------------------------------------------


def test_configure_creates_the_policy_from_the_flags_and_applies_it(rigdir, service, croot):
    pid = project(service)
    out = configure(rigdir, service, croot, "--multi-user", "--auth-policy-project-id", pid,
                    "--auth-policy-display-name", "Example Policy", "--allowed-domains", "example.org, *.example.org",
                    "--excluded-domains", "bad.example.org", "mep")
    assert out.returncode == 0, out.stderr
    policy_id = config_yaml(croot, "mep")["authentication_policy"]
    assert f"Created authentication policy {policy_id}" in out.stdout
    got = service.get(f"/v2/api/policies/{policy_id}")["policy"]
    assert got["project_id"] == pid and got["display_name"] == "Example Policy"
    assert got["domain_constraints_include"] == ["example.org", "*.example.org"]
    assert got["domain_constraints_exclude"] == ["bad.example.org"]
    assert got["high_assurance"] is False and got["authentication_assurance_timeout"] is None


def test_auth_timeout_also_sets_high_assurance(rigdir, service, croot):
    out = configure(rigdir, service, croot, "--multi-user", "--auth-policy-project-id", project(service),
                    "--auth-timeout", "600", "mep")
    assert out.returncode == 0, out.stderr
    got = service.get(f"/v2/api/policies/{config_yaml(croot, 'mep')['authentication_policy']}")["policy"]
    assert got["high_assurance"] is True and got["authentication_assurance_timeout"] == 600


def test_without_a_project_id_a_script_is_told_which_flag_and_nothing_is_made(rigdir, service, croot):
    out = configure(rigdir, service, croot, "--multi-user", "--allowed-domains", "example.org", "mep")
    assert out.returncode == 1
    assert "pass --auth-policy-project-id PROJECT_ID" in out.stderr, out.stderr
    assert not (croot / "mep").exists()
    assert service.get("/v2/api/policies")["policies"] == []


def test_without_a_project_id_a_terminal_picks_or_creates_one(rigdir, service, croot):
    """The seed: "If not provided, the user will be prompted to create one"."""
    import pty
    master, slave = pty.openpty()
    proc_out = configure_on_tty(rigdir, service, croot, master, slave,
                                ["mep-a"], answers=["New project", "admin@example.org", "", "", "y"])
    made = service.get("/v2/api/projects")["projects"]
    assert [p["display_name"] for p in made] == ["New project"], proc_out
    policy_id = config_yaml(croot, "mep-a")["authentication_policy"]
    assert service.get(f"/v2/api/policies/{policy_id}")["policy"]["project_id"] == made[0]["id"]
    master, slave = pty.openpty()
    proc_out = configure_on_tty(rigdir, service, croot, master, slave, ["mep-b"], answers=["1"])
    assert f"1. id: {made[0]['id']}, name: New project" in proc_out
    policy_b = config_yaml(croot, "mep-b")["authentication_policy"]
    assert service.get(f"/v2/api/policies/{policy_b}")["policy"]["project_id"] == made[0]["id"]


def configure_on_tty(rigdir, service, croot, master, slave, names, answers) -> str:
    client_id, secret = service.add_client()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(croot.parent), "GLOBUS_COMPUTE_CLIENT_ID": client_id,
           "GLOBUS_COMPUTE_CLIENT_SECRET": secret, "GLOBUS_SDK_SERVICE_URL_AUTH": service.url + "/"}
    proc = subprocess.Popen([*MEPCTL, str(rigdir.lib), "configure", "--multi-user", "--excluded-domains",
                             "bad.example.org", "--config-root", str(croot), "--broker-user",
                             rigdir.accounts.broker.pw_name, "--uep-executable", str(rigdir.probe), *names],
                            stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    text, pending, answered = b"", list(answers), 0  # answered: how much of `text` the last answer followed
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        ready, _, _ = select.select([master], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        text += chunk
        if text.rstrip().endswith(b":") and text[answered:].strip():  # a new prompt, not the echo of an answer
            if not pending:
                proc.kill()
                break
            os.write(master, pending.pop(0).encode() + b"\n")
            answered = len(text)
    proc.wait(timeout=30)
    os.close(master)
    out = text.decode(errors="replace")
    assert proc.returncode == 0, out
    return out


def test_the_seeds_over_specified_high_assurance_command_line(rigdir, service, croot):
    out = configure(rigdir, service, croot,
                    "--multi-user",
                    "--display-name", "Example High-Assurance Compute Endpoint",
                    "--high-assurance",
                    "--subscription-id", SUBSCRIPTION,
                    "--auth-policy-project-id", project(service),
                    "--allowed-domains", "example.edu,*.example.edu",
                    "--auth-timeout", "1800",
                    "example_ha_compute_endpoint")
    assert out.returncode == 0, out.stderr
    cfg = config_yaml(croot, "example_ha_compute_endpoint")
    assert cfg["high_assurance"] is True and cfg["subscription_id"] == SUBSCRIPTION
    assert cfg["display_name"] == "Example High-Assurance Compute Endpoint"
    got = service.get(f"/v2/api/policies/{cfg['authentication_policy']}")["policy"]
    assert got["high_assurance"] is True and got["authentication_assurance_timeout"] == 1800
    assert got["domain_constraints_include"] == ["example.edu", "*.example.edu"]


def test_configure_help_explains_each_policy_flag(rigdir):
    out = subprocess.run([*MEPCTL, str(rigdir.lib), "configure", "--help"], capture_output=True, text=True)
    for flag, words in (("--auth-policy-project-id", "creates a new one"),
                        ("--auth-policy-display-name", "user-friendly name"),
                        ("--allowed-domains", "wildcards"), ("--excluded-domains", "domain_constraints_exclude"),
                        ("--auth-timeout", "high-assurance")):
        assert flag in out.stdout and words in out.stdout, (flag, out.stdout)


# -- Apply an Existing Authentication Policy: what a user then sees ------------------


def refusal_of(service, user, endpoint_id) -> dict:
    return run_sdk(service, user, WHOAMI + f"""
from globus_sdk.gare import to_gares
with Executor(endpoint_id={endpoint_id!r}, client=client) as ex:
    try:
        print(json.dumps({{"ran": ex.submit(whoami, 21).result(timeout=90)}}))
    except Exception as e:
        gares = to_gares([e])
        print(json.dumps({{"type": type(e).__name__, "status": getattr(e, "http_status", None),
                          "code": getattr(e, "code", None), "message": str(e),
                          "policies": [g.authorization_parameters.session_required_policies for g in gares]}}))
""")


def test_an_allowed_user_runs_and_excluded_stale_and_outside_users_are_refused(rigdir, service):
    pid = policy(service, domain_constraints_include=["example.org", "*.example.org"],
                 domain_constraints_exclude=["bad.example.org"], high_assurance=True,
                 authentication_assurance_timeout=1800)
    service.identities["mept-bob@example.org"]["last_authentication"] = time.time() - 7200
    service.write_identities()
    mep = live_mep(rigdir, service, config={"authentication_policy": pid})
    try:
        assert run_sdk(service, "mept-alice@example.org", WHOAMI + f"""
with Executor(endpoint_id={mep.endpoint_id!r}, client=client) as ex:
    print(json.dumps(ex.submit(whoami, 21).result(timeout=90)))
""") == {"user": "mept-alice", "x": 42}
        for user, why in (("mallory@bad.example.org", "mallory@bad.example.org is from an excluded domain "
                                                      "(bad.example.org; domain_constraints_exclude: bad.example.org)"),
                          ("mept-bob@example.org", "more than the authentication_assurance_timeout of 1800 s"),
                          ("eve@elsewhere.org", "eve@elsewhere.org is not from an allowed domain")):
            got = refusal_of(service, user, mep.endpoint_id)
            assert got.get("status") == 403 and got["code"] == "AuthorizationRequired", got
            assert why in got["message"] and pid in got["message"], got
            assert got["policies"] == [[pid]], got  # a GARE: the SDK (with a GlobusApp) logs in for this policy
        assert "user endpoint started" in mep.output() and mep.output().count("user endpoint started") == 1
    finally:
        mep.stop()


# -- High-Assurance functions ------------------------------------------------------------


def ha_mep(rigdir, service, pid):
    folder = rigdir.path / f"audit-{os.urandom(3).hex()}"
    folder.mkdir()
    os.chown(folder, rigdir.accounts.broker.pw_uid, rigdir.accounts.broker.pw_gid)
    return live_mep(rigdir, service, config={
        "high_assurance": True, "subscription_id": SUBSCRIPTION, "authentication_policy": pid,
        "audit_log_path": str(folder / "audit.log")}), folder / "audit.log"


def test_an_ha_function_runs_on_its_ha_endpoint_only_and_its_task_is_audited(rigdir, service):
    pid = policy(service, domain_constraints_include=["example.org"], high_assurance=True,
                 authentication_assurance_timeout=1800)
    (ha, audit), plain = ha_mep(rigdir, service, pid), live_mep(rigdir, service)
    try:
        got = run_sdk(service, "mept-alice@example.org", HA_FUNC + f"""
import warnings
ha_endpoint_id = {ha.endpoint_id!r}
gc = client
ex = Executor(client=client)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    ha_func_id_via_client = gc.register_function(ha_func, ha_endpoint_id=ha_endpoint_id)
    ha_func_id_via_ex = ex.register_function(ha_func, ha_endpoint_id=ha_endpoint_id)
    ex.shutdown()
    print(ha_func_id_via_ex)
    ha_function_id = ha_func_id_via_ex
    with Executor(endpoint_id=ha_endpoint_id, client=client) as ex:
        # the seed passes a bare string; SDK 4.19 requires a tuple ("args: expected `tuple`"): README
        fut = ex.submit_to_registered_function(ha_function_id, ("ha-worthy-argument-to-function",))
        print("\\nResult:", fut.result(timeout=90))
        result, task_id = fut.result(), fut.task_id
try:
    with Executor(endpoint_id={plain.endpoint_id!r}, client=client) as ex:
        ex.submit_to_registered_function(ha_function_id, ("elsewhere",)).result(timeout=60)
    elsewhere = "ran"
except Exception as e:
    elsewhere = str(e)
try:
    client.register_function(ha_func, ha_endpoint_id={plain.endpoint_id!r})
    not_ha = "registered"
except Exception as e:
    not_ha = str(e)
print(json.dumps({{"fid": ha_function_id, "tid": task_id, "result": result, "elsewhere": elsewhere,
                  "not_ha": not_ha, "warnings": [str(w.message) for w in seen]}}))
""")
        assert got["result"].startswith("ha_func: ") and got["result"].endswith(
            " - processed pii: ha-worthy-argument-to-function"), got
        assert "It is your responsibility to ensure disclosure of regulated data" in " ".join(got["warnings"]), got
        # the result was not pushed (the notice carries none) but fetched, with the policy checked
        assert f"HA task {got['tid']}: result retrieved through the API by mept-alice@example.org" in service.output()
        assert f"is a high-assurance function of endpoint {ha.endpoint_id}; it may not run on endpoint " \
               f"{plain.endpoint_id}" in got["elsewhere"], got
        assert f"Endpoint {plain.endpoint_id} is not a high-assurance endpoint" in got["not_ha"], got
        assert "user endpoint started" not in plain.output()
        records = wait_for(lambda: [line for line in audit.read_text().splitlines()
                                            if f"tid={got['tid']}" in line and "EXEC_END" in line] and
                                   audit.read_text(), what="the HA task's audit records")
        mine = [line for line in records.splitlines() if f"tid={got['tid']}" in line]
        assert all(f"fid={got['fid']}" in line for line in mine), mine
        assert [line.split()[-1] for line in mine if line.split()[-1] in ("RECEIVED", "EXEC_START", "EXEC_END")] == \
            ["RECEIVED", "EXEC_START", "EXEC_END"], mine
    finally:
        ha.stop()
        plain.stop()


def test_an_ha_result_is_refused_at_retrieval_once_the_authentication_is_stale(rigdir, service):
    """The seed: the service verifies "at the time of retrieval, that all HA requirements
    are met". Alice submits while her login is fresh; her last authentication then ages
    past the timeout (the identities file stands for Auth's session) before she fetches."""
    pid = policy(service, domain_constraints_include=["example.org"], high_assurance=True,
                 authentication_assurance_timeout=1800)
    ha, _ = ha_mep(rigdir, service, pid)
    try:
        got = run_sdk(service, "mept-alice@example.org", HA_FUNC + f"""
import time
fid = client.register_function(ha_func, ha_endpoint_id={ha.endpoint_id!r})
batch = client.create_batch()
batch.add(fid, args=("pii",))
tid = client.batch_run({ha.endpoint_id!r}, batch)["tasks"][fid][0]
for _ in range(300):
    task = client.get_task(tid)
    if not task["pending"]:
        break
    time.sleep(0.3)
fresh = task["result"]
path = {str(service.identities_path)!r}
doc = json.load(open(path))
for ids in doc["tokens"].values():
    for i in ids:
        if i["username"] == "mept-alice@example.org":
            i["last_authentication"] = time.time() - 3600
open(path + ".tmp", "w").write(json.dumps(doc))
os.replace(path + ".tmp", path)
fetcher = type(client)(local_compute_services=True,  # a new Client: the SDK caches a completed task
                      authorizer=globus_sdk.AccessTokenAuthorizer(os.environ["GC_TOKEN"]))
try:
    fetcher.get_task(tid)
    stale = "returned"
except Exception as e:
    stale = [getattr(e, "http_status", None), str(e)]
print(json.dumps({{"fresh": fresh, "stale": stale}}))
""")
        assert got["fresh"].endswith("processed pii: pii"), got
        status, message = got["stale"]
        assert status == 403 and "last authenticated 3600 s ago, more than the authentication_assurance_timeout " \
                                  "of 1800 s: log in again" in message, got
    finally:
        ha.stop()
