"""Where settings come from (environment first) and how secrets are kept out of output."""
from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672//"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_COLLECTOR_QUEUE = "amqprpc.responses"  # where submit() replies go (topology.Topology)

# user:password@ inside any URL-looking text, for every scheme we speak (amqp, amqps,
# redis, rediss, ...). Matching in free text, not only in known keys, is what makes
# the "never in a log line or an error" promise hold for exception messages too.
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s;]*):(?P<password>[^@\s;/]*)@")
# A password alone before the host (redis://secret@host, as redis-py reads it) and
# password-like query parameters (?password=..., ?sentinel_password=...).
_BARE_PASSWORD = re.compile(r"(?P<scheme>redis(?:s|\+sentinel)?://)(?P<password>[^:/@\s;,]+)@", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&](?:sentinel_)?password=)[^&\s;]*", re.IGNORECASE)


def broker_url(url: str | None = None) -> str:
    """The broker URL: the argument, else ``AMQPRPC_BROKER_URL``, else the local default."""
    return url or os.environ.get("AMQPRPC_BROKER_URL") or DEFAULT_BROKER_URL


def redis_url(url: str | None = None) -> str:
    """The Redis URL: the argument, else ``AMQPRPC_REDIS_URL``, else the local default."""
    return url or os.environ.get("AMQPRPC_REDIS_URL") or DEFAULT_REDIS_URL


SENTINEL_SCHEME = "redis+sentinel://"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    """``redis+sentinel://[[user]:password@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]``, read.
    ``password`` (and ``username``) are the master's; the sentinels themselves are asked
    without one unless the query names ``sentinel_password=...``."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read a ``redis+sentinel://`` URL; ValueError (without the password) says what is wrong."""
    if not url.lower().startswith(SENTINEL_SCHEME):
        raise ValueError(f"not a {SENTINEL_SCHEME} URL: {redact(url)}")
    rest, _, query = url[len(SENTINEL_SCHEME):].partition("?")
    location, _, path = rest.partition("/")
    userinfo, at, hosts = location.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = unquote(user) or None, (unquote(secret) if colon else unquote(user)) or None
        if not colon:
            username = None  # redis+sentinel://password@... : a password alone, as redis:// reads it
    sentinels = []
    for address in filter(None, hosts.split(",")):
        host, port = _host_port(address, url)
        sentinels.append((host, port))
    parts = [part for part in path.split("/") if part]
    if not sentinels or not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"a Sentinel URL is redis+sentinel://[:password@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB], "
                         f"got {redact(url)}")
    options = parse_qs(query)
    sentinel_password = options.get("sentinel_password", [None])[0]
    return SentinelURL(tuple(sentinels), unquote(parts[0]), int(parts[1]) if len(parts) == 2 else 0, username,
                       password, sentinel_password)


def _host_port(address: str, url: str) -> tuple[str, int]:
    if address.startswith("["):  # [::1]:26379
        host, _, port = address[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = address.rpartition(":") if ":" in address else (address, "", "")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"bad sentinel address {address!r} in {redact(url)}")
    return host, int(port) if port else DEFAULT_SENTINEL_PORT


def redis_client(url: str | None = None, timeout: float | None = 5.0, *, decode_responses: bool = False,
                 asyncio: bool = False, retries: int | None = 0) -> Any:
    """The one way amqprpc connects to Redis: a ``redis.Redis`` (``redis.asyncio.Redis`` with
    ``asyncio=True``) for ``url`` (default ``AMQPRPC_REDIS_URL``), a plain ``redis://``,
    ``rediss://`` or ``unix://`` URL or a Sentinel one (:func:`parse_sentinel_url`): then the
    client asks the sentinels for the current master on every new connection, so after a
    failover it writes to the promoted replica.

    ``timeout`` bounds connect and each read (seconds). ``retries`` is how often redis-py
    retries a command on a connection error by itself: 0 (the default) lets each caller
    decide what an unreachable Redis means (the breaker and the registry carry on without
    it); None keeps redis-py's own default.
    """
    url = redis_url(url)
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                               "decode_responses": decode_responses}
    if retries is not None:
        if asyncio:
            from redis.asyncio.retry import Retry as AsyncRetry
            from redis.backoff import ExponentialBackoff, NoBackoff

            options["retry"] = AsyncRetry(NoBackoff() if retries == 0 else ExponentialBackoff(cap=1.0), retries)
        else:
            from redis.backoff import ExponentialBackoff, NoBackoff
            from redis.retry import Retry

            options["retry"] = Retry(NoBackoff() if retries == 0 else ExponentialBackoff(cap=1.0), retries)
    if not url.lower().startswith(SENTINEL_SCHEME):
        if asyncio:
            import redis.asyncio

            return redis.asyncio.Redis.from_url(url, **options)
        import redis

        return redis.Redis.from_url(url, **options)
    parsed = parse_sentinel_url(url)
    sentinel_options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if parsed.sentinel_password:
        sentinel_options["password"] = parsed.sentinel_password
    if asyncio:
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        sentinel: Any = AsyncSentinel(parsed.sentinels, sentinel_kwargs=sentinel_options)
    else:
        from redis.sentinel import Sentinel

        sentinel = Sentinel(parsed.sentinels, sentinel_kwargs=sentinel_options)
    return sentinel.master_for(parsed.master, db=parsed.db, username=parsed.username, password=parsed.password,
                               **options)


def redact(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``***``."""
    if "password=" in text.lower():
        text = _QUERY_PASSWORD.sub(r"\g<key>***", text)
    if "@" not in text:
        return text
    return _BARE_PASSWORD.sub(r"\g<scheme>***@", _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text))


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
