"""Pure broker logic: start-command checks, config.yaml errors, identity mapping (the
seed's examples), failure notice bytes."""

import json
import pathlib
import time
import uuid

import pytest

from broker import commands, config, idmap, notices, registration
from broker.refusal import Refused

IDENT = {"id": "1c6dbe57-4a3e-44e5-826e-0280003585ae", "sub": "1c6dbe57-4a3e-44e5-826e-0280003585ae",
         "username": "jess@example.org", "status": "used", "identity_provider": "62dc25b7-c693-4528-831b-4557a7a0d1e4"}
UNI = {"id": "d427502d-722b-4361-ad34-9327010a7b81", "sub": "d427502d-722b-4361-ad34-9327010a7b81",
       "username": "jessica.jazz.jess@university.example.edu", "status": "used",
       "identity_provider": "09a7033a-b53b-44e2-8c71-b60f0468df07"}


def body(**over):
    msg = {"command": "cmd_start_endpoint", "args": [],
           "kwargs": {"name": str(uuid.uuid4()), "amqp_creds": {"endpoint_id": "e", "heartbeat_queue_info": {}},
                      "user_opts": {"a": 1}, "user_runtime": {}},
           "globus_effective_identity": IDENT["id"], "globus_identity_set": [IDENT], "globus_username": "jess"}
    msg.update(over)
    return json.dumps(msg).encode()


def test_a_good_command_parses():
    cmd = commands.parse(body(), "application/json", time.time())
    assert cmd.user_opts == {"a": 1} and cmd.identity_set == [IDENT] and cmd.endpoint_id == "e"


@pytest.mark.parametrize("raw, ctype, skew, message", [
    (body(), "text/plain", 0, "expecting JSON"),
    (b"{nope", "application/json", 0, "Unable to deserialize"),
    (b"[1]", "application/json", 0, "Unable to deserialize"),
    (body(), "application/json", 185, "Command too old"),
    (body(), "application/json", -185, "Command too old"),
    (body(command="cmd_shell"), "application/json", 0, "Unknown or invalid command"),
    (body(globus_identity_set="x"), "application/json", 0, "not a list of identities"),
    (json.dumps({"command": "cmd_start_endpoint", "kwargs": {"name": "x"}}).encode(), "application/json", 0,
     "KeyError"),
])
def test_bad_commands_are_refused_with_a_reason(raw, ctype, skew, message):
    with pytest.raises(Refused, match=message):
        commands.parse(raw, ctype, time.time() - skew)


@pytest.mark.parametrize("name", ["../etc", "-rf", "", "a/b", "x" * 129, 5])
def test_uep_names_are_checked_early(name):
    raw = json.loads(body())
    raw["kwargs"]["name"] = name
    with pytest.raises(Refused, match="endpoint name"):
        commands.parse(json.dumps(raw).encode(), "application/json", time.time())


def test_rejection_keeps_kwargs_for_the_notice():
    with pytest.raises(Refused) as e:
        commands.parse(body(command="bad"), "application/json", time.time())
    assert "amqp_creds" in e.value.kwargs


def test_status_report_bytes_match_globus_compute_common():
    raw = notices.status_report("00000000-0000-0000-0000-000000000001", "x")
    # the bytes globus-compute-common 1.0 packs for the same EPStatusReport
    assert raw == (b'\x01{"message_type":"ep_status_report","data":{"endpoint_id":"00000000-0000-0000-0000-'
                   b'000000000001","global_state":{"error":"x","heartbeat_period":3},"task_statuses":{}}}')
    assert notices.start_failed("jessica", "(PermissionError) see your system administrator") == \
        "Unable to start user endpoint process for jessica [(PermissionError) see your system administrator]"


def write_config(tmp_path, text):
    (tmp_path / "config.yaml").write_text(text)
    return tmp_path


def test_config_loads_upstream_keys(tmp_path):
    cfg = config.load_config(write_config(tmp_path, "multi_user: true\nidentity_mapping_config_path: idmap.json\n"
                                          "display_name: HPC\npam: {enable: true}\nallowed_functions: "
                                          "['00000000-0000-0000-0000-000000000001']\n"))
    assert cfg.identity_mapping_config_path == tmp_path / "idmap.json"
    assert cfg.pam.enable and cfg.pam.service_name == "globus-compute-endpoint"
    assert cfg.allowed_functions == ("00000000-0000-0000-0000-000000000001",)
    assert cfg.user_config_template_path == tmp_path / "user_config_template.yaml.j2"


@pytest.mark.parametrize("text, message", [
    ("multi_user: true\nidentity_mapping_config_path: x\ndisplay_nmae: y\n", "unknown key 'display_nmae' .did you mean 'display_name'"),
    ("multi_user: true\nidentity_mapping_config_path: x\nengine: {type: x}\n", "configures a user endpoint.*move it to user_config_template"),
    ("multi_user: true\nidentity_mapping_config_path: x\nhigh_assurance: 'yes'\n", "high_assurance is 'yes' .str.; write true or false"),
    ("multi_user: true\nidentity_mapping_config_path: x\nheartbeat_period: -1\n", "heartbeat_period is -1"),
    ("multi_user: true\nidentity_mapping_config_path: x\nsubscription_id: nope\n", "write a Globus subscription id"),
    ("multi_user: true\n", "identity_mapping_config_path is required"),
    ("multi_user: false\ndisplay_name: x\nidentity_mapping_config_path: x\n", "multi_user must be true or absent"),
    ("multi_user: true\nidentity_mapping_config_path: x\nhigh_assurance: true\n", "high_assurance needs subscription_id"),
    ("multi_user: true\nidentity_mapping_config_path: x\npam: {enabled: true}\n", "pam: unknown key 'enabled'"),
    ("- a list\n", "top level must be a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_config_errors_name_file_key_and_fix(tmp_path, text, message):
    with pytest.raises(config.ConfigError, match=message) as e:
        config.load_config(write_config(tmp_path, text))
    assert str(tmp_path / "config.yaml") in str(e.value)


def test_missing_config_says_how_to_create_it(tmp_path):
    with pytest.raises(config.ConfigError, match="mepctl configure --multi-user"):
        config.load_config(tmp_path / "nope")


def mappers(tmp_path, documents):
    path = tmp_path / "idmap.json"
    path.write_text(json.dumps(documents))
    return idmap.load(path, "ep")


def test_seed_example_maps_as_it_says(tmp_path):
    """The configure example is the seed's two-entry one: "/bin/false always returns with a
    non-zero exit code and so will be ignored" (a warning names it), then the expression
    maps jessica@example.com -> jessica; nothing else maps."""
    from broker import seed
    path = tmp_path / "example.json"
    path.write_text(seed.IDMAP_EXAMPLE)
    m = idmap.load(path, "ep")
    assert [kind for kind, _ in m] == ["external_identity_mapping#1.0.0", "expression_identity_mapping#1.0.0"]
    warnings = []
    got = idmap.map_identity_set(m, [dict(IDENT, username="jessica@example.com")],
                                 warn=lambda msg, **kw: warnings.append((msg, kw)))
    assert got.username == "jessica" and got.identity == IDENT["id"] and got.rule.startswith("mapper 2 ")
    assert len(warnings) == 1 and warnings[0][1]["mapper"] == "mapper 1 of 2 (external_identity_mapping#1.0.0)"
    assert idmap.map_identity_set(m, [dict(IDENT, username="jessica@example.org")]) is None


def test_upstream_docstring_examples_and_first_match(tmp_path):
    """identity_mapper.py's example: the university rule maps the second identity; after
    the edit to example.org, the first identity maps instead."""
    uni = [{"DATA_TYPE": "expression_identity_mapping#1.0.0",
            "mappings": [{"source": "{username}", "match": r"(.*)@university\.example\.edu", "output": "{0}"}]}]
    assert idmap.map_identity_set(mappers(tmp_path, uni), [IDENT, UNI]).username == "jessica.jazz.jess"
    org = [{"DATA_TYPE": "expression_identity_mapping#1.0.0",
            "mappings": [{"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}"}]}]
    assert idmap.map_identity_set(mappers(tmp_path, org), [IDENT, UNI]).username == "jess"
    both = mappers(tmp_path, org + uni)  # first mapper wins
    got = idmap.map_identity_set(both, [UNI, IDENT])
    assert got.username == "jess" and got.rule == "mapper 1 (expression_identity_mapping#1.0.0) rule 1"
    assert got.candidates == [[{IDENT["id"]: ["jess"]}], [{UNI["id"]: ["jessica.jazz.jess"]}]]


@pytest.mark.parametrize("doc, message", [
    ("not json", "not valid JSON"), ("[]", "non-empty JSON list"), ('[{"DATA_TYPE": "nope#1"}]', "unknown DATA_TYPE"),
    ('[{"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": [{"source": "{username}", "match": "\\\\q", '
     '"output": "x"}]}]', "invalid mapping document"),
])
def test_invalid_mapping_files_are_refused(tmp_path, doc, message):
    path = tmp_path / "m.json"
    path.write_text(doc)
    with pytest.raises(idmap.MappingConfigError, match=message):
        idmap.load(path, "ep")


class Log:
    def __init__(self):
        self.lines = []

    def info(self, event, **kw):
        self.lines.append(("info", event))

    def warning(self, event, **kw):
        self.lines.append(("warning", event))

    def error(self, event, **kw):
        self.lines.append(("error", event))


def test_reload_keeps_old_mapping_on_invalid_missing_and_unreadable(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(seed_doc := json.dumps([{"DATA_TYPE": "expression_identity_mapping#1.0.0", "mappings": [
        {"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}"}]}]))
    log = Log()
    mapper = idmap.IdentityMapper(path, "ep", log)
    path.write_text("[")
    assert mapper.reload_if_changed() is False and mapper.map([IDENT]).username == "jess"
    path.unlink()
    assert mapper.reload_if_changed() is False and mapper.map([IDENT]).username == "jess"
    path.write_text(seed_doc.replace("example", "elsewhere"))
    assert mapper.reload_if_changed() is True and mapper.map([IDENT]) is None
    assert [level for level, _ in log.lines] == ["error", "error", "info"]


def test_registration_needs_a_credential_and_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.delenv("GLOBUS_COMPUTE_CLIENT_ID", raising=False)
    monkeypatch.delenv("GLOBUS_COMPUTE_CLIENT_SECRET", raising=False)
    cfg = config.load_config(write_config(tmp_path, "multi_user: true\nidentity_mapping_config_path: i.json\n"))
    assert registration.service_url(cfg) == "https://compute.api.globus.org"  # upstream's default: production
    cfg = config.load_config(write_config(tmp_path, "multi_user: true\nidentity_mapping_config_path: i.json\n"
                                          "local_compute_services: true\n"))
    assert registration.service_url(cfg) == "http://localhost:5000"
    with pytest.raises(registration.CredentialRefused, match=f"run `mepctl login {tmp_path.name}` as root"):
        registration.obtain(cfg, None)
    (tmp_path / "registration.json").write_text(json.dumps({"endpoint_id": "e", "command_queue_info": {"queue": "q"}}))
    with pytest.raises(registration.RegistrationError, match="command_queue_info needs connection_url and queue"):
        registration.obtain(cfg, None)
    assert registration.peek(cfg) == "e"


def test_a_reply_with_another_endpoint_id_is_refused(tmp_path):
    """As upstream: "mismatched endpoint id". The service here is a plain HTTP server that
    answers every PUT with another id (what a confused or hostile service would do); the
    saved id stays."""
    import http.server
    import threading
    mine, other = "0f5d1c3e-8a4b-4c2d-9e6f-7a8b9c0d1e2f", "11111111-2222-4333-8444-555555555555"
    info = {"connection_url": "amqp://u:p@127.0.0.1:5672/", "queue": "q",
            "queue_publish_kwargs": {"exchange": "x", "routing_key": "r"}}

    class Service(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"endpoint_id": other, "command_queue_info": info, "heartbeat_queue_info": info}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "token").write_text("t")
        cfg = config.load_config(write_config(tmp_path, "multi_user: true\nidentity_mapping_config_path: i.json\n"
                                              f"compute_service_url: http://127.0.0.1:{server.server_port}\n"
                                              "compute_service_token_file: token\n"))
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "endpoint.json").write_text(json.dumps({"endpoint_id": mine}))
        with pytest.raises(registration.RegistrationError,
                           match=f"mismatched endpoint id. Expected: {mine}, received: {other}") as e:
            registration.obtain(cfg, None)
        assert not isinstance(e.value, registration.Retryable)  # a start ends here: retrying gives the same reply
        assert registration.peek(cfg) == mine
    finally:
        server.shutdown()


def test_environment_selects_the_services_and_the_token_namespace(tmp_path, monkeypatch):
    from broker import globus_login
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_ID", "6f6b2e5c-0f83-4f0b-9d5e-0d8c3a1f7e11")
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_SECRET", "s")
    monkeypatch.delenv("GLOBUS_SDK_SERVICE_URL_AUTH", raising=False)
    cfg = config.load_config(write_config(tmp_path, "multi_user: true\nidentity_mapping_config_path: i.json\n"
                                          "environment: sandbox\n"))
    assert registration.service_url(cfg) == "https://compute.api.sandbox.globuscs.info"  # upstream's table
    app = globus_login.make_app(cfg)
    assert app.config.environment == "sandbox" and app._login_client.base_url.startswith("https://auth.sandbox.")
    assert app.token_storage.token_storage.namespace == "clientprofile/sandbox/6f6b2e5c-0f83-4f0b-9d5e-0d8c3a1f7e11"
    assert registration.update_url_port("amqps://u:p@h.example:5671/v", 443) == "amqps://u:p@h.example:443/v"
    assert registration.update_url_port("amqps://u:p@h.example/v", 443) == "amqps://u:p@h.example:443/v"


def test_the_broker_starts_no_thread_at_import():
    """A thread with SIGHUP unblocked takes a SIGHUP that the main thread holds across a
    re-exec, and that reload is lost (importing globus_compute_sdk starts one)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import os, sys; sys.path.insert(0, sys.argv[1]); import broker.main; "
                          "print(len(os.listdir('/proc/self/task')))", str(pathlib.Path(__file__).parent.parent)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1", out


def test_amqp_reconnect_backs_off_to_a_ceiling():
    from broker.intake import RECONNECT_MAX_S, reconnect_delay
    delays = [reconnect_delay(n) for n in range(1, 10)]
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert delays[5:] == [RECONNECT_MAX_S] * 4 and RECONNECT_MAX_S == 16.0
