"""Say plainly when the AMQP server's TLS certificate was refused.

aio-pika/aiormq connect to an amqps:// URL with `ssl.create_default_context()`: the
certificate must chain to a trusted CA and name the host (check_hostname). The trusted
CAs are OpenSSL's defaults, which SSL_CERT_FILE and SSL_CERT_DIR replace; in launch mode
those reach the broker through the helper's allow-list (privhelper/policy.BROKER_ENV).
A refusal surfaces as AMQPConnectionError with the SSL error as its cause; this finds it
and says what was refused, against which CAs, and what to change.
"""

from __future__ import annotations

import os
import ssl

import yarl


def refused(exc: BaseException, url: str | None) -> dict | None:
    """Fields for the log line if `exc` (or what caused it) is a certificate refusal, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ssl.SSLCertVerificationError):
            return {"server": _where(url), "reason": exc.verify_message or str(exc), "trusted_cas": trusted_cas(),
                    "fix": "give the broker the CA that signed the server's certificate: SSL_CERT_FILE or SSL_CERT_DIR "
                           "in the environment of `mepctl start` or of the systemd unit (docs/deploying.md)"}
        exc = exc.__cause__ or exc.__context__
    return None


def trusted_cas() -> str:
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    paths = ssl.get_default_verify_paths()
    return f"the system's ({paths.cafile or paths.capath})"


def _where(url: str | None) -> str:
    try:
        parsed = yarl.URL(url or "")
        return f"{parsed.scheme}://{parsed.host}:{parsed.port}"  # never the credentials in the URL
    except (TypeError, ValueError):
        return "?"
