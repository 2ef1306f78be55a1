"""Where settings come from (environment first) and how secrets are kept out of output."""
from __future__ import annotations

import os
import re
import ssl
from typing import Any

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672//"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_COLLECTOR_QUEUE = "amqprpc.responses"  # where submit() replies go (topology.Topology)

# user:password@ inside any URL-looking text, for every scheme we speak (amqp, amqps,
# redis, rediss, ...). Matching in free text, not only in known keys, is what makes
# the "never in a log line or an error" promise hold for exception messages too.
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s;]*):(?P<password>[^@\s;/]*)@")


def broker_url(url: str | None = None) -> str:
    """The broker URL: the argument, else ``AMQPRPC_BROKER_URL``, else the local default."""
    return url or os.environ.get("AMQPRPC_BROKER_URL") or DEFAULT_BROKER_URL


def redis_url(url: str | None = None) -> str:
    """The Redis URL: the argument, else ``AMQPRPC_REDIS_URL``, else the local default."""
    return url or os.environ.get("AMQPRPC_REDIS_URL") or DEFAULT_REDIS_URL


def redis_client(url: str, timeout: float) -> Any:
    """A ``redis.Redis`` that gives up after ``timeout`` seconds (connect and read) and never
    retries on its own: each caller decides what an unreachable Redis means (the breaker and
    the registry carry on without it)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 0))


def redact(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``***``."""
    if "@" not in text:
        return text
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)


def ssl_options(url: str) -> dict[str, Any] | bool:
    """TLS settings for an ``amqps://`` URL, from the environment; False for plain ``amqp://``.

    The certificate chain *and* the host name are verified by default (the host name of
    whichever failover URL is in use). ``AMQPRPC_SSL_CA_FILE`` names a private CA bundle;
    ``AMQPRPC_SSL_CERT_FILE``/``AMQPRPC_SSL_KEY_FILE`` a client certificate for mutual TLS;
    ``AMQPRPC_SSL_VERIFY=0`` turns verification off (for a lab, never for production).
    """
    if not url.lower().startswith("amqps://"):
        return False
    options: dict[str, Any] = {}
    if os.environ.get("AMQPRPC_SSL_VERIFY", "1").lower() in ("0", "false", "no", "off"):
        options["cert_reqs"] = ssl.CERT_NONE
    else:
        options["cert_reqs"] = ssl.CERT_REQUIRED
        options["server_hostname"] = None  # kombu fills in the current broker's host name
    for key, variable in (("ca_certs", "AMQPRPC_SSL_CA_FILE"), ("certfile", "AMQPRPC_SSL_CERT_FILE"),
                          ("keyfile", "AMQPRPC_SSL_KEY_FILE")):
        if os.environ.get(variable):
            options[key] = os.environ[variable]
    return options
