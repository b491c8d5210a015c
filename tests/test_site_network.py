"""Site networks: the proxy, CA and Globus SDK variables of the helper's environment reach
the broker (and nothing else does) through the real `--launch` path, and the broker
speaks AMQPS with certificate and hostname verification, against a TLS listener of the
real RabbitMQ with a CA this test creates. The listener is started at run time
(rabbit_networking:start_ssl_listener) and stopped afterwards: RabbitMQ is never
restarted and its configuration files are not touched."""

import datetime
import ipaddress
import os
import socket
import subprocess
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.rigs import procs
from tests.rigs.mep import LiveMEP
from tests.rigs.procs import wait_for

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("rabbitmq")]

LISTED = {"HTTPS_PROXY": "http://proxy.site.invalid:3128", "https_proxy": "http://proxy.site.invalid:3128",
          "HTTP_PROXY": "http://proxy.site.invalid:3128", "NO_PROXY": "localhost,127.0.0.1",
          "no_proxy": "localhost", "REQUESTS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt",
          "SSL_CERT_DIR": "/etc/ssl/certs", "GLOBUS_SDK_HTTP_TIMEOUT": "42",
          "GLOBUS_COMPUTE_CLIENT_ID": str(uuid.UUID(int=5)), "GLOBUS_COMPUTE_CLIENT_SECRET": "s3cret"}
UNLISTED = {"MEPT_SITE_SECRET": "not for the broker", "GLOBUS_COMPUTE_OTHER": "x", "AWS_SECRET_ACCESS_KEY": "y",
            "MY_GLOBUS_SDK_X": "z"}


def broker_environ(mep) -> dict:
    raw = open(f"/proc/{mep.broker_pid()}/environ", "rb").read()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if item)


def test_listed_variables_reach_the_broker_and_no_others(rigdir, monkeypatch):
    for name, value in {**LISTED, **UNLISTED}.items():
        monkeypatch.setenv(name, value)
    mep = LiveMEP(rigdir)
    try:
        env = broker_environ(mep)
    finally:
        mep.stop()
        mep.remove()
    assert {k: env.get(k) for k in LISTED} == LISTED
    assert not set(UNLISTED) & set(env), env
    assert env["HOME"] == rigdir.accounts.broker.pw_dir and env["USER"] == rigdir.accounts.broker.pw_name


# -- AMQPS -----------------------------------------------------------------------------

def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, key, issuer, issuer_key, *, ca=False, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(path, obj):
    data = obj.public_bytes(serialization.Encoding.PEM) if isinstance(obj, x509.Certificate) else obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(data)
    os.chmod(path, 0o644)  # RabbitMQ (its own account) reads them; test keys only
    return path


class TLSListener:
    """A TLS listener of the shared RabbitMQ on a free loopback port, with a server
    certificate for `sans` signed by `signer` (cert, key)."""

    def __init__(self, directory, tag, signer, sans):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert("mept amqps server", key, signer[0].subject, signer[1], sans=sans)
        self.cert, self.key = _pem(directory / f"{tag}.pem", cert), _pem(directory / f"{tag}.key", key)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._eval(f'rabbit_networking:start_ssl_listener({{"127.0.0.1", {self.port}}}, [{{certfile, "{self.cert}"}}, '
                   f'{{keyfile, "{self.key}"}}, {{verify, verify_none}}], 1).')

    @staticmethod
    def _eval(expr):
        out = subprocess.run(["rabbitmqctl", "eval", expr], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr

    def url(self, host="localhost"):
        return f"amqps://guest:guest@{host}:{self.port}/"

    def stop(self):
        self._eval(f'rabbit_networking:stop_tcp_listener({{"127.0.0.1", {self.port}}}).')


@pytest.fixture
def pki(rigdir):
    """The site's CA (the one the broker is told to trust) and an unrelated one."""
    d = rigdir.path / f"pki-{os.urandom(3).hex()}"
    d.mkdir(mode=0o755)
    cas = {}
    for tag in ("site", "other"):
        key = ec.generate_private_key(ec.SECP256R1())
        cas[tag] = (_cert(f"mept {tag} CA", key, _name(f"mept {tag} CA"), key, ca=True), key)
        _pem(d / f"{tag}-ca.pem", cas[tag][0])
    listeners = []

    def listener(signer, sans):
        listeners.append(TLSListener(d, f"server-{len(listeners)}", cas[signer], sans))
        return listeners[-1]
    yield d, listener
    for one in listeners:
        one.stop()
    procs.run("rm", "-rf", str(d))


LOCAL = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


def start(rigdir, monkeypatch, ca_file, url, wait):
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # reaches the broker through the helper's allow-list
    return LiveMEP(rigdir, amqp_url=url, wait=wait)


def test_amqps_with_the_site_ca_connects_and_serves(rigdir, monkeypatch, pki):
    d, listener = pki
    server = listener("site", LOCAL)
    mep = start(rigdir, monkeypatch, d / "site-ca.pem", server.url(), wait=True)
    try:
        mep.publish(mep.command("mept-alice@example.org"))
        assert mep.report()[0]["resuid"][0] == rigdir.accounts.alice.pw_uid  # a command came in over TLS and was served
    finally:
        mep.stop()
        mep.remove()


@pytest.mark.parametrize("signer, sans, reason", [
    ("other", LOCAL, "unable to get local issuer certificate"),  # not signed by the CA the broker trusts
    ("site", (x509.DNSName("amqp.elsewhere.invalid"),), "Hostname mismatch"),  # the right CA, another host's name
])
def test_a_wrong_certificate_is_refused_with_a_line_that_says_so(rigdir, monkeypatch, pki, signer, sans, reason):
    d, listener = pki
    server = listener(signer, sans)
    mep = start(rigdir, monkeypatch, d / "site-ca.pem", server.url(), wait=False)
    try:
        wait_for(lambda: mep.proc.poll() is not None, 30, what="the broker to give up")
        out = mep.output()
        assert "AMQP server's TLS certificate refused; not connecting" in out, out
        assert reason in out, out
        assert f"amqps://localhost:{server.port}" in out and "SSL_CERT_FILE=" in out
        assert "guest:guest" not in out  # the URL's credentials stay out of the log
        assert "consuming start commands" not in out
    finally:
        mep.stop()
        mep.remove()
