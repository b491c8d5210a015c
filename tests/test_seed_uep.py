"""The seed chapter on the user endpoint side (issue 16), with the real SDK, the local
service and the real globus-compute-endpoint UEP:

  - "user_environment.yaml" / the wrapper trick: `PATH: /usr/local/admin_scripts/` puts a
    site's own `globus-compute-endpoint` wrapper first; the Quickstart's PATH without
    /usr/bin still starts the UEP;
  - "debug: true": the rendered config between the seed's sentinel lines in the UEP's own
    endpoint.log, where the seed's `sed -n "/Begin Compute/,/End Compute/p"` finds it;
  - a UEP that dies at once: its user's future fails with a notice, not a silent wait.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import subprocess

import pytest

from tests.rigs import procs
from tests.rigs.service import UEP_PROGRAM, UEP_TEMPLATE, run_sdk

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.usefixtures("no_strays", "rabbitmq")]
WHOAMI = """
def whoami(x):
    import os, pwd
    return {"user": pwd.getpwuid(os.getuid()).pw_name, "path": os.environ["PATH"], "marker": os.environ.get("SITE_WRAPPED")}
"""
SUBMIT = """
with Executor(endpoint_id={eid!r}, client=client) as ex:
    try:
        print(json.dumps({{"result": ex.submit(whoami, 1).result(timeout=90)}}))
    except Exception as e:
        print(json.dumps({{"error": str(e)}}))
"""


@pytest.fixture
def admin_scripts(rigdir):
    """The seed's /usr/local/admin_scripts/, root-owned, with its globus-compute-endpoint wrapper."""
    path = rigdir.path / f"admin_scripts-{secrets.token_hex(3)}"
    path.mkdir(mode=0o755)
    yield path
    procs.run("rm", "-rf", str(path))


def wrapper(folder: pathlib.Path, body: str) -> None:
    script = folder / "globus-compute-endpoint"
    script.write_text("#!/bin/sh\n" + body)
    os.chmod(script, 0o755)


def submit(service, mep) -> dict:
    return run_sdk(service, "mept-alice@example.org", WHOAMI + SUBMIT.format(eid=mep.endpoint_id))


def test_a_site_wrapper_on_the_path_runs_first(service, mep, admin_scripts):
    wrapper(admin_scripts, "# remove the admin_scripts entry from the PATH, as the seed's example does\n"
                           "export PATH=/usr/local/bin:/usr/bin:/bin SITE_WRAPPED=yes\n"
                           f"exec {UEP_PROGRAM.rsplit('/', 1)[0]}/globus-compute-endpoint \"$@\"\n")
    m = mep(environment={"PATH": f"{admin_scripts}/"})
    out = submit(service, m)
    assert out.get("result", {}).get("marker") == "yes", out
    assert out["result"]["user"] == "mept-alice"


def test_the_quickstarts_path_without_usr_bin_still_starts_the_uep(service, mep):
    m = mep(environment={"PATH": "/site/specific:/path:/opt:/usr:/some/other/path"})
    out = submit(service, m)
    assert out.get("result", {}).get("user") == "mept-alice", out
    assert out["result"]["path"].startswith("/site/specific:/path:/opt:/usr:/some/other/path:")


def test_debug_true_puts_the_config_between_the_seeds_sentinels_in_the_ueps_log(service, mep, accounts):
    m = mep(template="debug: true\n" + UEP_TEMPLATE)
    out = submit(service, m)
    assert "result" in out, out
    logs = list(pathlib.Path(accounts.alice.pw_dir, ".globus_compute").glob("*/endpoint.log"))
    recipe = subprocess.run(["sed", "-n", "/Begin Compute/,/End Compute/p", *map(str, logs)], capture_output=True,
                            text=True).stdout
    assert "Begin Compute endpoint configuration (" in recipe and recipe.rstrip().endswith(
        "End Compute endpoint configuration"), recipe
    assert "   debug: true" in recipe and "   engine:" in recipe


def test_a_uep_that_dies_at_once_fails_its_users_future_with_a_notice(service, mep, admin_scripts):
    wrapper(admin_scripts, "echo 'site wrapper: the module system is down' >&2\nexit 3\n")
    m = mep(environment={"PATH": f"{admin_scripts}/"})
    out = submit(service, m)
    assert "the user endpoint process ended" in out.get("error", ""), out
    assert "Command return code: 3" in out["error"] and "endpoint.log" in out["error"]
