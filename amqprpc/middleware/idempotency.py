"""Idempotency keys: ``call/cast/submit(..., idempotency_key="order-42")`` runs the handler at
most once per key and service within its ``dedup_window`` (24 h by default).

The key travels in the envelope's headers (``idempotency_key``), so a peer in another
language can send one too. Before the handler runs, the worker claims the key in Redis
(``amqprpc:idem:{service}:{key}``, one atomic script: set it if absent, else return what is
there). The claim names the message id that holds it, so the same message coming back -- a
retry through the delay queue, a redelivery after a worker died -- is not taken for a
duplicate of itself and runs. Once the handler's outcome is final (a reply or an error
reply) it is stored in the claim, kept for the window (a dead letter frees the key instead,
so that its replay runs):

- a duplicate cast is acked unrun, counted ``deduplicated``;
- a duplicate call gets the stored reply (the first call's data, or its error), counted
  ``deduplicated``; while the first still runs it waits for it (polling Redis, on the handler
  thread, bounded by its own deadline: then it is answered CallTimeout). A claim whose
  holder's deadline passed unanswered (its message expired after a crash) is taken over.

Redis down: the handler runs (at-least-once, as without a key), one warning per outage.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable

from amqprpc import context, logs
from amqprpc.middleware import Delivery, Middleware
from amqprpc.middleware.redisstate import REDIS_TIMEOUT_S, RedisHealth, RedisState
from amqprpc.outcome import Outcome, OutcomeKind
from amqprpc.server.dispatcher import Decision
from amqprpc.service import DEFAULT_DEDUP_WINDOW
from amqprpc.wire import envelope
from amqprpc.middleware.view import WorkerView

log = logs.get_logger("amqprpc.idempotency")

HEADER = "idempotency_key"  # in the envelope's headers
KEY_PREFIX = "amqprpc:idem"
MAX_KEY_LENGTH = 200  # longer keys are stored by their SHA-256 (never cut: two keys must not collide)
ABANDON_MARGIN_S = 1.0  # after its holder's deadline, a running claim is taken over
WAIT_POLL_S = (0.02, 0.25)  # a waiting duplicate polls from the first to the second, doubling
MAX_WAIT_S = 60.0  # a duplicate without a deadline (submit) waits at most this long

# The outcomes after which a key counts as used; anything else (a retry scheduled, a copy
# delayed) leaves the claim to the same message, which comes back. A dead letter frees the
# key instead: it is there to be looked at and replayed (``amqprpc dlq --replay`` keeps the
# message id), and a replay must run.
FINAL = frozenset({OutcomeKind.REPLIED, OutcomeKind.DONE, OutcomeKind.FAILED})

_CLAIM = """
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

_RELEASE = """
local held = redis.call('GET', KEYS[1])
if held and cjson.decode(held)['message_id'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


class IdempotencyStore(RedisState):
    """Claims and stored outcomes of idempotency keys in Redis (``url``, default
    ``AMQPRPC_REDIS_URL``), keys under ``prefix``; the client is made on first use."""

    def __init__(self, url: str | None = None, *, prefix: str = KEY_PREFIX, timeout: float = REDIS_TIMEOUT_S):
        super().__init__(url, prefix, timeout)

    def key(self, service: str, idempotency_key: str) -> str:
        return f"{self.prefix}:{service}:{idempotency_key}"

    def claim(self, service: str, idempotency_key: str, claim: dict[str, Any], window: float) -> dict[str, Any] | None:
        """Claim the key with ``claim`` for ``window`` seconds: None when claimed now, else
        what holds it (``{"state": "running"|"done", "message_id", "until", "reply"}``)."""
        held = self.redis.eval(_CLAIM, 1, self.key(service, idempotency_key), json.dumps(claim), _ms(window))
        return None if held is None else _parse(held)

    def get(self, service: str, idempotency_key: str) -> dict[str, Any] | None:
        held = self.redis.get(self.key(service, idempotency_key))
        return None if held is None else _parse(held)

    def take_over(self, service: str, idempotency_key: str, old: dict[str, Any], claim: dict[str, Any],
                  window: float) -> bool:
        """Replace the claim ``old`` (exactly as read) with ``claim``; False if it changed meanwhile."""
        return bool(self.redis.eval(_TAKE_OVER, 1, self.key(service, idempotency_key), old["_raw"],
                                    json.dumps(claim), _ms(window)))

    def release(self, service: str, idempotency_key: str, message_id: str | None) -> bool:
        """Free the key if ``message_id`` holds it (its message was dead-lettered)."""
        return bool(self.redis.eval(_RELEASE, 1, self.key(service, idempotency_key), message_id or ""))

    def finish(self, service: str, idempotency_key: str, message_id: str | None, reply: dict[str, Any],
               window: float) -> None:
        """Store the final outcome (the reply document, without its message_id) for ``window`` s."""
        self.redis.set(self.key(service, idempotency_key),
                       json.dumps({"state": "done", "message_id": message_id, "reply": reply}), px=_ms(window))


class Idempotency(Middleware):
    """Worker middleware: runs a handler at most once per idempotency key (see the module
    doc). Added to every worker; the chain skips it for a message without a key."""

    consume_gate = (("body_headers", HEADER),)

    def __init__(self, store: IdempotencyStore | None = None) -> None:
        self.store = store or IdempotencyStore()
        self.health = RedisHealth("idempotency keys")
        self.service: Any = None

    def worker_starting(self, worker: WorkerView) -> None:
        self.service = worker.service

    def consume_scope(self, call_next: Callable[[Delivery], Decision], delivery: Delivery) -> Decision:
        key = delivery.body_headers.get(HEADER)
        # Events are not de-duplicated: each of a service's event handlers gets its own copy of
        # one message (same id), which a key per service would take for repeats.
        if not key or not isinstance(key, str) or delivery.kind == "event":
            return call_next(delivery)
        token = context.scope.set(context.RunScope(context.scope.get().cancel, key))
        try:
            return self._once(call_next, delivery, _stored_key(key))
        finally:
            context.scope.reset(token)

    def window_of(self, delivery: Delivery) -> float:
        service = self.service
        if service is None:
            return DEFAULT_DEDUP_WINDOW
        window: float = service.dedup_window_of(delivery.handler or delivery.action or "")
        return window

    def _once(self, call_next: Callable[[Delivery], Decision], delivery: Delivery, key: str) -> Decision:
        window = self.window_of(delivery)
        claim = _claim_of(delivery)
        now = time.monotonic()
        if not self.health.usable(now):
            return call_next(delivery)
        try:
            held = self.store.claim(delivery.service, key, claim, window)
        except Exception as exc:  # noqa: BLE001 - redis down: run it (at-least-once)
            self.health.failed(exc, now)
            return call_next(delivery)
        self.health.answered()
        if held is not None and not _ours(held, delivery):
            return self._duplicate(call_next, delivery, key, held, window)
        return self._run(call_next, delivery, key, window)

    def _run(self, call_next: Callable[[Delivery], Decision], delivery: Delivery, key: str, window: float) -> Decision:
        decision = call_next(delivery)
        outcome = decision.outcome
        try:
            if outcome.kind in FINAL:
                self.store.finish(delivery.service, key, delivery.message_id, _reply_of(decision, outcome), window)
            elif outcome.kind is OutcomeKind.DEAD_LETTERED:
                self.store.release(delivery.service, key, delivery.message_id)
        except Exception as exc:  # noqa: BLE001 - the key stays claimed by this message; duplicates wait
            self.health.failed(exc, time.monotonic())
        return decision

    def _duplicate(self, call_next: Callable[[Delivery], Decision], delivery: Delivery, key: str,
                   held: dict[str, Any], window: float) -> Decision:
        """A message whose key another message holds: a cast is acked; a call gets the
        stored reply, waiting while the holder runs."""
        log.info("duplicate idempotency key", idempotency_key=key, message_id=delivery.message_id,
                 holder=held.get("message_id"), state=held.get("state"), kind=delivery.kind)
        if delivery.kind != "call" or not delivery.reply_to:
            acked: Decision = delivery.decide.ack(delivery, OutcomeKind.DEDUPLICATED)
            return acked
        deadline = delivery.deadline
        give_up = time.time() + MAX_WAIT_S if deadline is None else deadline
        pause = WAIT_POLL_S[0]
        current: dict[str, Any] | None = held
        while True:
            if current is None:  # gone (window over, or deleted): claim it afresh
                current = self.store.claim(delivery.service, key, _claim_of(delivery), window)
                if current is None:
                    return self._run(call_next, delivery, key, window)
            if current.get("state") == "done":
                return _answer(delivery, current.get("reply") or {}, OutcomeKind.DEDUPLICATED)
            until = current.get("until")
            now = time.time()
            if isinstance(until, (int, float)) and now > until + ABANDON_MARGIN_S and \
                    self.store.take_over(delivery.service, key, current, _claim_of(delivery), window):
                log.warning("idempotency key taken over: its holder's deadline passed unanswered",
                            idempotency_key=key, holder=current.get("message_id"))
                return self._run(call_next, delivery, key, window)
            if now + pause > give_up:
                return _answer(delivery, {"success": False, "error_type": "CallTimeout",
                                          "error": f"the first call with idempotency key {key!r} is still running"},
                               OutcomeKind.EXPIRED)
            time.sleep(pause)
            pause = min(pause * 2, WAIT_POLL_S[1])
            try:
                current = self.store.get(delivery.service, key)
            except Exception as exc:  # noqa: BLE001 - redis went down while waiting: run (at-least-once)
                self.health.failed(exc, time.monotonic())
                return call_next(delivery)


def _stored_key(key: str) -> str:
    if len(key) <= MAX_KEY_LENGTH:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _parse(raw: bytes | str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):  # not ours: treat as a finished run with nothing to replay
        doc = {"state": "done", "reply": {"success": True, "data": None}}
    doc["_raw"] = raw
    return doc


def _claim_of(delivery: Delivery) -> dict[str, Any]:
    deadline = delivery.deadline
    return {"state": "running", "message_id": delivery.message_id, "until": deadline}


def _ours(held: dict[str, Any], delivery: Delivery) -> bool:
    """The claim is this very message's (a retry or redelivery of it) and it has not finished."""
    return (held.get("state") == "running" and bool(delivery.message_id)
            and held.get("message_id") == delivery.message_id)


def _reply_of(decision: Decision, outcome: Outcome) -> dict[str, Any]:
    """What is replayed to duplicates: the reply document without its message_id (a cast's
    outcome as one, for the record)."""
    body = decision.body
    if body:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            doc.pop("message_id", None)
            return doc
    if outcome.ok:
        return {"success": True, "data": None}
    return {"success": False, "error": outcome.error_type or "failed", "error_type": outcome.error_type or "Error"}


def _answer(delivery: Delivery, reply: dict[str, Any], kind: OutcomeKind) -> Decision:
    """The Decision answering ``delivery`` with the stored ``reply`` document."""
    if reply.get("success"):
        body, error_type = envelope.ok_reply(reply.get("data"), delivery.message_id), None
    else:
        error_type = str(reply.get("error_type") or "RemoteError")
        body = envelope.error_reply(str(reply.get("error")), error_type, delivery.message_id, reply.get("errors"))
    return Decision(delivery.reply_to, delivery.correlation_id, body,
                    outcome=Outcome(kind, error_type, time.perf_counter() - delivery.started))
