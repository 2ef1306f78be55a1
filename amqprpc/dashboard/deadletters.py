"""Dead letters in the dashboard: browse them (bodies redacted), and replay or purge them
through :class:`Operations`, which confirms nothing by itself (the page asks first) but
makes every change idempotent and audited.

Idempotent: each change carries an ``action_id`` the page makes when the operator confirms;
a second request with the same id (a double click, a resubmitted form, a retried fetch)
gets the first one's result back, marked ``duplicate``, and changes nothing. Replaying one
letter by message id is idempotent on its own as well: once replayed, it is no longer in the
dead-letter queue. The ids are remembered in this process (the last ``remember`` of them).

Audited: every change is logged (logger ``amqprpc.dashboard``, event ``dashboard action``)
with who made it (the Basic user, or token/local and the client address), what, on which
service, and its result, and kept in a short list the page shows.
"""
from __future__ import annotations

import collections
import json
import re
import threading
import time
from typing import Any, Callable

from amqprpc import logs
from amqprpc.config import redact
from amqprpc.ops import dlq
from amqprpc.retry import headers_of
from amqprpc.wire.topology import DEFAULT_TOPOLOGY

log = logs.get_logger("amqprpc.dashboard")

PREVIEW_CHARS = 2000
ACTION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
# Values of keys that look like secrets are replaced in previews (and amqprpc.config.redact
# strips the password out of any URL left in the text).
SECRET_KEYS = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|auth|credential|private[_-]?key|cvv|card",
                         re.IGNORECASE)


def redact_value(value: Any, depth: int = 0) -> Any:
    """``value`` with the values of secret-looking keys replaced by ``***``."""
    if depth > 32:
        return "…"
    if isinstance(value, dict):
        return {key: "***" if isinstance(key, str) and SECRET_KEYS.search(key) else redact_value(item, depth + 1)
                for key, item in value.items()}
    if isinstance(value, list):
        return [redact_value(item, depth + 1) for item in value]
    return value


def preview(body: bytes | str, limit: int = PREVIEW_CHARS) -> str:
    """A body as text for people: JSON re-indented with secrets redacted, else the text
    (undecodable bytes replaced), cut at ``limit`` characters."""
    raw = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and "payload" in doc:  # what the operator looks for first
            doc = {"payload": doc["payload"], **{key: value for key, value in doc.items() if key != "payload"}}
        shown = json.dumps(redact_value(doc), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        shown = raw
    shown = redact(shown)
    return shown if len(shown) <= limit else shown[:limit] + f"… ({len(shown) - limit} more characters)"


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def browse(service: str, limit: int, broker_url: str) -> dict[str, Any]:
    """The first ``limit`` dead letters of ``service`` (nothing is consumed): what
    ``amqprpc dlq`` says of each, plus their headers and a redacted body preview."""
    count, messages = dlq.peek(service, limit, broker_url=broker_url)
    letters = []
    for message in messages:
        headers = redact_value(_plain(headers_of(message)))
        letters.append({**dlq.describe(message), "headers": json.loads(redact(json.dumps(headers))),
                        "body_preview": preview(message.body or b"")})
    return {"service": service, "queue": DEFAULT_TOPOLOGY.dead_queue_name(service), "count": count,
            "messages": letters}


class DuplicateAction(Exception):
    """An action id that is still being carried out by another request."""


class Operations:
    """Replay and purge, idempotent per action id and audited (see the module docstring)."""

    def __init__(self, broker_url: str, remember: int = 1000, recent: int = 50, redis_url: str | None = None):
        self.broker_url = broker_url
        self.redis_url = redis_url
        self.remember = remember
        self._done: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=recent)
        # Name -> (service, parameters) -> result: POST /api/{name}/{service}.
        self.handlers: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
            "replay": self._replay, "purge": self._purge, "revoke": self._revoke}

    def _revoke(self, service: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """Revoke a message by id for every worker of ``service`` (as ``amqprpc revoke``)."""
        from amqprpc.middleware.revoke import RevocationStore

        message_id = str(parameters.get("message_id") or "")
        if not message_id:
            raise ValueError("revoke needs a message_id")
        return {"revoked": RevocationStore(self.redis_url).revoke(service, [message_id])}

    def _replay(self, service: str, parameters: dict[str, Any]) -> dict[str, Any]:
        message_id = parameters.get("message_id")
        replayed, unroutable = dlq.replay(service, broker_url=self.broker_url,
                                          message_id=str(message_id) if message_id else None)
        return {"replayed": replayed, "unroutable": unroutable}

    def _purge(self, service: str, parameters: dict[str, Any]) -> dict[str, Any]:
        return {"purged": dlq.purge(service, broker_url=self.broker_url)}

    def run(self, what: str, service: str, action_id: str, who: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """Carry out ``what`` once per ``action_id``; the result (``duplicate`` when it was
        carried out before). Raises KeyError for an unknown ``what``, ValueError for a bad id,
        :class:`DuplicateAction` while the same id is still running."""
        handler = self.handlers[what]
        if not ACTION_ID.match(action_id):
            raise ValueError("action_id must be 8-64 letters, digits, - or _")
        with self._lock:
            if action_id in self._done:
                return {**self._done[action_id], "duplicate": True}
            if action_id in self._running:
                raise DuplicateAction(action_id)
            self._running.add(action_id)
        try:
            started = time.time()
            try:
                result = {"ok": True, **handler(service, parameters)}
            except Exception as exc:  # noqa: BLE001 - reported to the page, logged with who asked
                result = {"ok": False, "error": redact(f"{type(exc).__name__}: {exc}")}
            entry = {"at": round(started, 3), "who": who, "what": what, "service": service,
                     "message_id": parameters.get("message_id"), "action_id": action_id, **result}
            (log.info if result["ok"] else log.warning)("dashboard action", **entry)
            with self._lock:
                self._done[action_id] = result
                while len(self._done) > self.remember:
                    self._done.popitem(last=False)
                self.recent.appendleft(entry)
            return {**result, "duplicate": False}
        finally:
            with self._lock:
                self._running.discard(action_id)
