"""The MEP logs in, registers, heartbeats and reconnects as upstream's does (issue 17),
against the local service's Globus Auth routes with access tokens that expire in three
seconds: client credentials (a ClientApp), `mepctl login` (a UserApp and its code),
expiry across reloads and restarts, a revoked secret, heartbeats, amqp_port, and RabbitMQ
refusing the MEP's account. globus-sdk is pointed at the service the way a user selects a
non-production Auth (GLOBUS_SDK_SERVICE_URL_AUTH, from `auth_service_url`)."""

import json
import os
import pathlib
import socket
import stat
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest

from broker import globus_login
from tests.rigs.mep import MEPCTL, VENV_PYTHON, many
from tests.rigs.procs import wait_for
from tests.rigs.service import LocalService, live_mep, registered_id, run_sdk

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.usefixtures("no_strays", "rabbitmq")]

LIFETIME_S = 3  # every access token the service issues here
EXPIRED_S = LIFETIME_S + 1.5
ADMIN = "admin@example.org"
MANAGEMENT = "http://127.0.0.1:15672"

WHOAMI = """
def whoami(x):
    import os, pwd
    return {"user": pwd.getpwuid(os.getuid()).pw_name, "x": x * 2}
"""


@pytest.fixture
def service(rigdir):
    svc = LocalService(rigdir, token_lifetime=LIFETIME_S)
    yield svc
    svc.stop()


@pytest.fixture
def mep(rigdir, service):
    yield from many(lambda **kw: live_mep(rigdir, service, **kw))


def registrations(service, m) -> list:
    return service.get(f"/v3/endpoints/{m.endpoint_id}/registrations")


def status(service, m) -> dict:
    return service.get(f"/v2/endpoints/{m.endpoint_id}/status")


def run_whoami(service, m, user="mept-alice@example.org") -> dict:
    return run_sdk(service, user, WHOAMI + f"""
with Executor(endpoint_id={m.endpoint_id!r}, client=client) as ex:
    print(json.dumps(ex.submit(whoami, 21).result(timeout=90)))
""")


def wait_log(m, text: str, count: int = 1, timeout: float = 60) -> str:
    try:
        wait_for(lambda: m.output().count(text) >= count, timeout, what=repr(text))
    except AssertionError as e:
        raise AssertionError(f"{e}; MEP log:\n{m.output()}") from None
    return m.output()


def test_client_credentials_register_and_survive_expiry_across_reload_and_restart(service, mep):
    m = mep(auth="client")
    (first,) = registrations(service, m)
    assert first["identity"] == m.client_id  # the broker registered as the client identity (a ClientApp)
    grants = service.output().count(f"client_credentials: client {m.client_id}")
    assert grants >= 1  # (globus-sdk renews a token 60 s before it expires: with these, at once)
    # upstream's body and User-Agent (globus_compute_sdk.Client.register_endpoint, CoreEndpoint.get_metadata)
    assert first["user_agent"].endswith("/globus-compute-sdk-4.19.0"), first["user_agent"]
    meta = first["body"]["metadata"]
    assert meta["endpoint_version"] == "4.19.0" and meta["hostname"] == socket.getfqdn()
    assert meta["local_user"] == m.accounts.broker.pw_name
    assert meta["endpoint_config"] == (m.dir / "config.yaml").read_text()
    assert meta["user_config_template"] == (m.dir / "user_config_template.yaml.j2").read_text()
    assert meta["user_config_schema"] == json.loads((m.dir / "user_config_schema.json").read_text())
    assert first["body"]["multi_user"] is True and first["body"]["endpoint_name"] == m.dir.name

    time.sleep(EXPIRED_S)  # every token the broker holds has expired
    pid = m.broker_pid()
    assert m.mepctl("reload").returncode == 0
    wait_log(m, "broker re-executed in place")
    assert m.broker_pid() == pid
    assert len(registrations(service, m)) == 1  # the new image serves on with the registration it was handed
    assert service.output().count("client_credentials: client") == grants  # and asked Auth nothing

    m.stop()
    m.relaunch()  # a restart registers again: the stored token expired, so the ClientApp gets a new one
    assert [r["endpoint_id"] for r in registrations(service, m)] == [m.endpoint_id] * 2
    assert service.output().count(f"client_credentials: client {m.client_id}") > grants
    assert run_whoami(service, m) == {"user": "mept-alice", "x": 42}


def test_a_revoked_client_secret_is_a_clear_error_then_a_new_one_is_used_without_a_restart(service, mep, accounts):
    m = mep(auth="client")
    m.stop()
    service.clients[m.client_id] = "the old secret was deleted"
    service.write_identities()  # the service revokes what the old secret got
    time.sleep(EXPIRED_S)
    m.relaunch(wait=False)
    out = wait_log(m, "Globus Auth refused the client credentials")
    line = next(x for x in out.splitlines() if "Globus Auth refused the client credentials" in x)
    assert f"client {m.client_id}" in line and "invalid_client" in line and "create a new one" in line
    credentials = json.loads((m.dir / "config.yaml").read_text())["client_credentials_file"]
    assert credentials in line and "retry_in_s=5" in line
    assert m.proc.poll() is None  # it waits and tries again: no restart loop
    pathlib.Path(credentials).write_text(f"GLOBUS_COMPUTE_CLIENT_ID={m.client_id}\n"
                                         f"GLOBUS_COMPUTE_CLIENT_SECRET={service.clients[m.client_id]}\n")
    wait_log(m, "consuming start commands", count=2)  # the next attempt uses the new secret
    assert len(registrations(service, m)) == 2


def test_a_secret_revoked_while_its_token_is_still_valid_is_the_same_clear_error(rigdir, accounts):
    """With Auth's own 48 h tokens, so no expiry hides the revocation: the next start says
    the secret was refused (not 48 h of 401s from the service)."""
    service = LocalService(rigdir)
    m = None
    try:
        m = live_mep(rigdir, service, auth="client")
        m.stop()
        service.clients[m.client_id] = "the old secret was deleted"
        service.write_identities()
        m.relaunch(wait=False)
        out = wait_log(m, "Globus Auth refused the client credentials")
        assert f"client {m.client_id}" in out.split("Globus Auth refused the client credentials")[1]
        assert m.proc.poll() is None
    finally:
        if m is not None:
            m.stop()
            m.remove()
        service.stop()


def login(m, username: str) -> tuple[subprocess.CompletedProcess, str]:
    """`mepctl login NAME` as an administrator does it: open the URL it prints, log in,
    paste the code back."""
    p = subprocess.Popen([VENV_PYTHON, "-I", "-c", MEPCTL.format(lib=str(m.rigdir.lib)), "login",
                          m.dir.name, "--config-root", str(m.rigdir.path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shown = []
    try:
        while not shown or not shown[-1].startswith("http"):
            line = p.stdout.readline()
            assert line, f"mepctl login printed no URL: {''.join(shown)} {p.stderr.read()}"
            shown.append(line.strip())
        with urllib.request.urlopen(shown[-1] + "&username=" + username, timeout=10) as r:
            code = r.read().decode().strip().splitlines()[-1]
        out, err = p.communicate(code + "\n", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), "\n".join(shown)


def test_mepctl_login_completes_with_a_code_and_the_broker_renews_the_tokens(service, mep, accounts):
    m = mep(auth="login", wait=False)
    out = wait_log(m, f"run `mepctl login {m.dir.name}` as root")
    assert "cannot register with the compute service; trying again" in out and m.proc.poll() is None
    done, shown = login(m, ADMIN)
    assert "Please authenticate with Globus here:" in shown
    admin = service.identities[ADMIN]["id"]
    assert done.returncode == 0 and f"Logged in as Globus identity {admin}" in done.stdout, done.stderr
    tokens = os.stat(m.dir / "run" / "globus_tokens.json")  # only root and the broker can read it
    assert (tokens.st_uid, stat.S_IMODE(tokens.st_mode)) == (accounts.broker.pw_uid, 0o600)
    assert stat.S_IMODE(os.stat(m.dir / "run").st_mode) == 0o700
    wait_log(m, "consuming start commands")  # the waiting broker's next attempt
    m.endpoint_id = registered_id(m)
    assert [r["identity"] for r in registrations(service, m)] == [admin]

    time.sleep(EXPIRED_S)
    m.stop()
    m.relaunch()  # the access token expired: the broker renews it with the refresh token, and writes it back
    assert f"refresh_token: {ADMIN} via client" in service.output()
    assert os.stat(m.dir / "run" / "globus_tokens.json").st_mtime > tokens.st_mtime
    assert [r["identity"] for r in registrations(service, m)] == [admin, admin]
    assert run_whoami(service, m) == {"user": "mept-alice", "x": 42}

    # the user revokes the login (as at app.globus.org/account/consents): the next start says what to run
    stored = json.loads((m.dir / "run" / "globus_tokens.json").read_text())["data"]["user/production"]
    for data in stored.values():
        form = urllib.parse.urlencode({"token": data["refresh_token"], "client_id": globus_login.NATIVE_CLIENT_ID})
        urllib.request.urlopen(service.url + "/v2/oauth2/token/revoke", data=form.encode(), timeout=10).read()
    time.sleep(EXPIRED_S)
    m.stop()
    m.relaunch(wait=False)
    out = wait_log(m, "Globus Auth refused the stored login")
    assert f"run `mepctl login {m.dir.name}` as root" in out.split("Globus Auth refused the stored login")[1]
    assert m.proc.poll() is None


def test_heartbeats_arrive_every_period_and_a_last_one_at_stop(service, mep):
    m = mep(config={"heartbeat_period": 5})  # upstream's minimum
    beats = wait_for(lambda: len(b := status(service, m)["heartbeats"]) >= 3 and b, 60, what="3 heartbeats")
    assert [b["global_state"] for b in beats] == [{"heartbeat_period": 5}] * len(beats)
    gaps = [b["received"] - a["received"] for a, b in zip(beats, beats[1:])]
    assert min(gaps) >= 4, gaps  # one per period, not more often
    assert status(service, m)["status"] == "online"
    m.stop()
    last = wait_for(lambda: (b := status(service, m)["heartbeats"])[-1]["global_state"]["heartbeat_period"]
                            == 0 and b[-1], 15, what="the final heartbeat")
    assert last["global_state"] == {"heartbeat_period": 0}  # upstream's "shutting down now"
    assert status(service, m)["status"] == "offline"


class Forwarder:
    """A TCP port that forwards to RabbitMQ's: shows which port the broker connects to."""

    def __init__(self, target=("127.0.0.1", 5672)):
        self.target, self.connections = target, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            b = socket.create_connection(self.target)
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    @staticmethod
    def _pump(x, y):
        try:
            while data := x.recv(65536):
                y.sendall(data)
        except OSError:
            pass
        finally:
            for s in (x, y):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_amqp_port_rewrites_the_command_queue_port(service, mep):
    forwarder = Forwarder()
    try:
        m = mep(config={"amqp_port": forwarder.port})
        assert forwarder.connections >= 1  # the broker consumed through the port amqp_port names
        assert f"amqp_port={forwarder.port}" in m.output()
    finally:
        forwarder.close()


def _management(method: str, path: str, body=None):
    import base64
    request = urllib.request.Request(MANAGEMENT + path, method=method, data=None if body is None else
                                     json.dumps(body).encode(), headers={
                                         "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
                                         "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read() or b"null")


def test_revoked_amqp_credentials_lead_to_a_new_registration(service, mep):
    m = mep()
    account = f"mep-{m.endpoint_id}"
    _management("PUT", f"/api/users/{account}", {"password": "revoked", "tags": ""})
    wait_for(lambda: any(c.get("user") == account for c in _management("GET", "/api/connections")), 30,
                     what="the broker's connection in the management API")
    for c in _management("GET", "/api/connections"):
        if c.get("user") == account:
            _management("DELETE", "/api/connections/" + urllib.request.quote(c["name"], safe=""))
    out = wait_log(m, "consuming start commands", count=2)
    assert "RabbitMQ refused the MEP's AMQP credentials; registering again for new ones" in out
    assert len(registrations(service, m)) == 2
    assert run_whoami(service, m) == {"user": "mept-alice", "x": 42}
