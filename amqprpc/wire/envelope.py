"""The JSON envelope on the wire: building requests and replies, and decoding them safely.

Only JSON is accepted. Anything that is not a JSON object with the fields below raises
:class:`~amqprpc.errors.BadMessage` with a reason a person can act on; the worker turns
that into an error reply or a dead letter. Nothing here evaluates or unpickles input.
"""
from __future__ import annotations

import json
import math
import random
import time
from typing import Any, Mapping

from amqprpc.errors import BadMessage, RemoteError, RemoteValidationError, Revoked

CONTENT_TYPE = "application/json"
# Peers sometimes send these for JSON; anything else (pickle, yaml, msgpack) is refused.
_JSON_TYPES = frozenset({"application/json", "text/json", "application/json; charset=utf-8"})

# AMQP short strings (reply_to and correlation_id travel back as properties and routing key).
SHORTSTR_MAX = 255

_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_encode_ascii = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode
_json_loads = json.loads
_getrandbits = random.getrandbits

# orjson, when installed (``pip install amqprpc[fast]``), does the common case: 4-6x faster
# on an envelope, 50x on a 1 MB body. Only where its answer is the stdlib's: anything it
# refuses, or may read or write differently, goes through the stdlib as before:
# - it reads an integer past 64 bits as a float (silently): a body with a run of 20 digits
#   is read by the stdlib (the check costs about as much as orjson's own read of a body);
# - it writes NaN and infinities as null where the stdlib refuses them: output with a null
#   in it is written again by the stdlib (which raises, or writes the same null);
# - it refuses NaN/Infinity literals, lone surrogates, integers past 64 bits, non-string
#   keys, a BOM, nesting past 1024 (the stdlib then decides as before); datetimes,
#   dataclasses and subclasses of str/int/dict/list are passed through to the stdlib.
# (It does write a UUID or an Enum, which the stdlib refuses.)
try:
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None  # type: ignore[assignment]
if orjson is not None:
    _odumps, _oloads, _OError = orjson.dumps, orjson.loads, orjson.JSONDecodeError
    _OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
    # Every digit made a "0": a run of 20 zeros is a number of 20 digits or more (a C scan:
    # a regular expression took 13 ms on a 1 MB body, this 1 ms).
    _DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
    _TWENTY_DIGITS = b"0" * 20
    _ORJSON_READS_UP_TO = 65536

    def _decode(body: bytes | str) -> Any:
        # Large bodies: the stdlib (as fast once the check is counted, and a worker that read
        # 1 MB bodies through orjson kept ~25 MB more resident afterwards).
        if (isinstance(body, (bytes, bytearray)) and len(body) <= _ORJSON_READS_UP_TO
                and _TWENTY_DIGITS not in body.translate(_DIGITS_TO_ZERO)):
            try:
                return _oloads(body)
            except _OError:
                pass
        return _json_loads(body)
else:
    _decode = _json_loads
JSON_LIBRARY = "orjson " + orjson.__version__ if orjson is not None else "json (stdlib)"


def new_id() -> str:
    """A random 128-bit id as 32 hex characters.

    From ``random`` (seeded from the OS, reseeded after fork), not ``os.urandom``: ids need
    to be unique, not secret, and the getrandom() syscall releases the GIL, so on a busy
    client every id cost a wait to win the GIL back (measured: ~60 us per id, two per call).
    """
    return "%032x" % _getrandbits(128)


def dumps(obj: Any) -> bytes:
    """Serialize to compact UTF-8 JSON. Raises TypeError/ValueError for what JSON cannot carry."""
    if orjson is not None:
        try:
            out = _odumps(obj, option=_OPTIONS)
        except TypeError:  # orjson.JSONEncodeError: the stdlib decides
            pass
        else:
            if b"null" not in out:
                return out
    text = _encode(obj)
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (a peer's "\ud800" decodes to one) has no UTF-8 form; JSON's
        # own \u escape carries it, and the reader gets back the very same string.
        return _encode_ascii(obj).encode()


def loads(body: bytes | str) -> Any:
    return _decode(body)


def request_body(
    *,
    message_id: str,
    source: str,
    target: str | None,  # None for events: they have no one target
    action: str,
    payload: Mapping[str, Any],
    reply_to: str | None,
    headers: Mapping[str, Any],
) -> bytes:
    """The request envelope (README, "Wire protocol in short"). ``correlation_id`` equals ``message_id`` so a
    foreign server that answers with the request's ``message_id`` only is still matched."""
    return dumps({
        "message_id": message_id,
        "source_service": source,
        "target_service": target,
        "action": action,
        "timestamp": int(time.time()),
        "correlation_id": message_id,
        "reply_to": reply_to,
        "headers": headers,
        "payload": payload,
    })


# Deadlines on the wire (docs/guides/deadlines.md). A call carries its deadline twice in the
# envelope's headers: ``deadline``, absolute epoch seconds of the sender's clock (what the
# seed's PHP peers read and write), and ``timeout_ms``, the milliseconds it had left when sent.
# A reader counts ``timeout_ms`` from the message's arrival on its own clock (as gRPC does
# with grpc-timeout), so hosts whose clocks disagree do not drop each other's calls; only a
# peer that sends the absolute deadline alone is compared with this host's clock.
# A copy that waited in a delay queue (a retry) carries what was left of it when it was
# parked, minus the delay, in the AMQP header REMAINING_MS_HEADER: that wins over the body's.
TIMEOUT_MS_HEADER = "timeout_ms"
# Not an AMQP property: the consumer notes in a delivery's properties when it reached this
# host (epoch s), so a request that waited among the prefetched ones counts that wait too.
ARRIVED_PROPERTY = "amqprpc_arrived"
REMAINING_MS_HEADER = "x-amqprpc-remaining-ms"


class Request:
    """A decoded, validated request or event."""

    __slots__ = ("message_id", "correlation_id", "reply_to", "source", "target", "action",
                 "payload", "headers", "arrived", "_remaining_ms")

    def __init__(self, message_id: str, correlation_id: str | None, reply_to: str | None, source: str | None,
                 target: str | None, action: str, payload: Any, headers: dict[str, Any], arrived: float | None = None,
                 remaining_ms: Any = None) -> None:
        self.message_id = message_id
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        self.source = source
        self.target = target
        self.action = action
        self.payload = payload
        self.headers = headers
        self.arrived = time.time() if arrived is None else arrived  # epoch s on this host's clock
        self._remaining_ms = remaining_ms  # from the AMQP headers of a parked copy, if any

    @property
    def deadline(self) -> float | None:
        """Epoch seconds *of this host's clock* after which nobody waits for the answer, or
        None. Arrival plus the time the sender had left (``timeout_ms``) when the message
        says it; else the sender's absolute ``deadline`` as is (a peer that sends only that:
        its clock and ours must agree). Anything that is not a finite number counts as absent
        (``1e999`` parses as inf, ``10**400`` has no float)."""
        remaining = _finite(self._remaining_ms)
        if remaining is None:
            remaining = _finite(self.headers.get(TIMEOUT_MS_HEADER))
        if remaining is not None:
            return self.arrived + remaining / 1000.0
        return _finite(self.headers.get("deadline"))

    @property
    def trace_id(self) -> str | None:
        value = self.headers.get("trace_id")
        return value if isinstance(value, str) else None


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None for anything else (bools, strings, inf, 10**400)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def shortstr_problem(name: str, value: str) -> str | None:
    """Why ``value`` cannot travel as an AMQP short string (at most 255 bytes), or None."""
    if value.isascii() and len(value) <= SHORTSTR_MAX:  # the usual case; isascii() is O(1)
        return None
    size = len(value.encode("utf-8", "surrogatepass"))  # as py-amqp encodes it
    if size > SHORTSTR_MAX:
        return f"{name} is {size} bytes long; an AMQP short string holds at most {SHORTSTR_MAX}"
    return None


def reply_address(properties: Mapping[str, Any], body: bytes | str) -> tuple[str | None, str | None]:
    """(reply_to, correlation_id) of a message that may not even be JSON, so that a bad
    request can still be answered. Properties first; the body only if it parses.
    ``reply_to`` is None too when it cannot be a routing key (:func:`shortstr_problem`);
    ``correlation_id`` is returned as found: the caller checks it before it becomes a property."""
    reply_to = properties.get("reply_to")
    correlation_id = properties.get("correlation_id")
    if reply_to and correlation_id:
        return reply_to, correlation_id
    try:
        doc = _decode(body)
    except (ValueError, TypeError, RecursionError):
        return reply_to, correlation_id
    if isinstance(doc, dict):
        reply_to = reply_to or _str_or_none(doc.get("reply_to"))
        correlation_id = (correlation_id or _str_or_none(doc.get("correlation_id"))
                          or _str_or_none(doc.get("message_id")))
    if reply_to is not None and shortstr_problem("reply_to", reply_to):
        reply_to = None
    return reply_to, correlation_id


def decode_request(body: bytes | str, properties: Mapping[str, Any], max_bytes: int | None = None) -> Request:
    """Validate and decode one request. Raises BadMessage naming what is wrong."""
    content_type = properties.get("content_type")
    if content_type and content_type.lower() not in _JSON_TYPES:
        raise BadMessage(f"Unsupported content type: {content_type} (only application/json is accepted)")
    if max_bytes is not None and len(body) > max_bytes:
        raise BadMessage(f"Message too large: {len(body)} bytes (limit {max_bytes})")
    try:
        doc = _decode(body)
    except (ValueError, TypeError) as exc:
        raise BadMessage(f"Malformed JSON: {exc}") from None
    except RecursionError:  # b"[" * 100000 is valid-looking JSON that nests past the C stack guard
        raise BadMessage("Malformed JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise BadMessage(f"Envelope must be a JSON object, got {type(doc).__name__}")
    action = doc.get("action")
    if not isinstance(action, str) or not action:
        raise BadMessage("Envelope has no action")
    if "payload" not in doc:
        raise BadMessage("Envelope has no payload")
    payload = doc["payload"]
    if not isinstance(payload, dict):
        raise BadMessage(f"Payload must be a JSON object, got {type(payload).__name__}")
    headers = doc.get("headers") or {}
    if not isinstance(headers, dict):
        raise BadMessage("Envelope headers must be a JSON object")
    message_id = _str_or_none(doc.get("message_id")) or properties.get("message_id") or new_id()
    correlation_id = properties.get("correlation_id") or _str_or_none(doc.get("correlation_id")) or message_id
    reply_to = properties.get("reply_to") or _str_or_none(doc.get("reply_to"))
    if reply_to is not None:
        # Both travel back as short strings (routing key, property): refuse them here, as
        # bad input with a reason, rather than fail to publish the reply after the handler ran.
        problem = shortstr_problem("reply_to", reply_to) or shortstr_problem("correlation_id", correlation_id)
        if problem:
            raise BadMessage(problem)
    amqp_headers = properties.get("application_headers")
    return Request(
        message_id,
        correlation_id,
        reply_to,
        doc.get("source_service"),
        doc.get("target_service"),
        action,
        payload,
        headers,
        properties.get(ARRIVED_PROPERTY) or time.time(),  # the arrival the remaining time counts from
        amqp_headers.get(REMAINING_MS_HEADER) if isinstance(amqp_headers, dict) else None,
    )


def decode_reply(body: bytes | str) -> Any:
    """A reply's body as JSON, or None when it is not JSON at all."""
    try:
        return loads(body)
    except (ValueError, TypeError, RecursionError):
        return None


def reply_ids(properties: Mapping[str, Any], doc: Any) -> list[str]:
    """The ids a reply may name its call by, in the order to try them: its correlation_id,
    then the ``message_id`` in its body (a foreign server may answer with that only)."""
    ids = []
    correlation_id = properties.get("correlation_id")
    if correlation_id:
        ids.append(str(correlation_id))
    message_id = doc.get("message_id") if isinstance(doc, dict) else None
    if isinstance(message_id, str) and message_id and message_id not in ids:
        ids.append(message_id)
    return ids


def ok_reply(data: Any, message_id: str | None) -> bytes:
    """Raises TypeError/ValueError when ``data`` is not JSON-serializable."""
    return dumps({"success": True, "data": data, "message_id": message_id})


# An error reply's optional "errors" list (a ValidationError's failing fields): bounded, so
# that a payload with thousands of bad fields (or a huge key) cannot make a huge reply.
MAX_REPLY_ERRORS = 50
MAX_REPLY_ERROR_TEXT = 300  # characters of each entry's loc, msg and type


def error_reply(error: str, error_type: str, message_id: str | None, errors: Any = None) -> bytes:
    """An error reply; ``errors`` (a ValidationError's list of ``{loc, msg, type}``) goes
    along as ``"errors"``, bounded by :func:`error_list`."""
    doc = {"success": False, "error": error, "error_type": error_type, "message_id": message_id}
    if errors:
        doc["errors"] = error_list(errors)
    return dumps(doc)


def error_list(errors: Any) -> list[dict[str, str]]:
    """``errors`` as the wire carries them (either way: built for a reply, read from one):
    at most :data:`MAX_REPLY_ERRORS` entries, each with string ``loc``, ``msg`` and ``type``
    of at most :data:`MAX_REPLY_ERROR_TEXT` characters; anything that is not an object skipped."""
    if not isinstance(errors, (list, tuple)):
        return []
    listed = []
    for entry in errors:
        if isinstance(entry, dict):
            listed.append({key: _text(entry.get(key)) for key in ("loc", "msg", "type")})
            if len(listed) == MAX_REPLY_ERRORS:
                break
    return listed


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else "" if value is None else str(value)
    return text[:MAX_REPLY_ERROR_TEXT]


def remote_error(doc: Mapping[str, Any]) -> RemoteError:
    """The RemoteError an error reply (a dict with ``"success": false``) stands for: a
    :class:`~amqprpc.errors.RemoteValidationError` with its ``errors`` for a ValidationError."""
    error, error_type, message_id = str(doc.get("error")), str(doc.get("error_type") or "RemoteError"), \
        doc.get("message_id")
    if error_type == "ValidationError":
        return RemoteValidationError(error, error_list(doc.get("errors")), message_id)
    if error_type == "Revoked":
        return Revoked(error, error_type, message_id)
    return RemoteError(error, error_type, message_id)


def _str_or_none(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)
