"""Several services wired together without a broker: :class:`InMemoryClient`.

As dramatiq's ``StubBroker`` and FastStream's ``TestRabbitBroker`` do: it has RpcClient's
methods and routes them to ``Service`` handlers in this process, with the wire's semantics.
Payloads and results cross as JSON; a failing handler reaches the caller as
:class:`~amqprpc.errors.RemoteError` with its ``error_type``; a service nobody serves is
:class:`~amqprpc.errors.ServiceUnavailable` (no queue is bound); an unknown action is
``RemoteError(error_type="UnknownAction")``; an event reaches every matching handler of
every service (topic patterns); nested calls and events from handlers go through the same
client carrying the trace id and deadline; a handler's ``retry=`` policy reruns it
(without the backoff wait). A cast or event whose handler fails for good lands in
:attr:`InMemoryClient.dead_letters`.

Casts, events and submits are queued and delivered once the operation that sent them
(the outermost call, cast or publish on this thread) has finished, as a broker delivers
them after the publisher moved on; so when ``client.call(...)`` returns to a test, every
event that call caused has been handled. Everything runs on the caller's thread:
``call_async`` returns a Future that is already done.

No RabbitMQ; a handler that keeps state in Redis still needs Redis. For one service alone,
with its calls answered by canned answers, see :mod:`amqprpc.testing.fake`.
"""
from __future__ import annotations

import contextvars
import functools
import itertools
import os
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, NamedTuple, Tuple

from amqprpc.wire import envelope
from amqprpc import logs
from amqprpc.context import CallContext, current
from amqprpc.errors import BadMessage, CallTimeout, ReplyTooLarge, ServiceUnavailable, ValidationError
from amqprpc.server.events import topic_matches
from amqprpc.retry import Retry, call_with_retry
from amqprpc.service import Service, client_installed
from amqprpc.testing.fake import Recorder, parsed

log = logs.get_logger("amqprpc.testing")

MAX_MESSAGE_BYTES = 1 << 20
MAX_REPLY_BYTES = 16 << 20


class DeadLetter(NamedTuple):
    """A cast or event the in-memory client could not deliver or whose handler failed for good:
    where ``amqprpc dlq`` would find it on a broker."""

    service: str
    kind: str  # "cast" or "event"
    action: str
    payload: dict
    error_type: str
    error: str


class InMemoryClient(Recorder):
    """RpcClient's methods (``call``, ``call_async``, ``cast``, ``publish_event``, ``submit``,
    ``proxy``, ``close``), served by ``services``' handlers in this process; see the module.

    ``service.client`` inside those handlers is this client (for the handlers' thread
    only). Records what was sent (:attr:`sent`, :attr:`calls`, ...), the casts and events
    that failed for good (:attr:`dead_letters`) and the replies of submits (:attr:`replies`,
    by correlation id, as the collector would store them).
    """

    def __init__(self, *services: Service, source: str = "in-memory-client", timeout: float = 5.0) -> None:
        super().__init__(source, timeout)
        self.services: Dict[str, Service] = {}
        self.dead_letters: List[DeadLetter] = []
        self.replies: Dict[str, dict] = {}
        self._started = time.time()
        self._local = threading.local()
        for service in services:
            self.add(service)

    def add(self, service: Service) -> "InMemoryClient":
        """Serve ``service`` too (a second one of the same name would compete for its
        queue on a broker; here it replaces the first)."""
        self.services[service.name] = service
        return self

    # --- RpcClient's API ---------------------------------------------------------------
    def call(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
             retry: Retry | None = None, returns: Any = None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        if retry is not None:
            return parsed(returns, call_with_retry(lambda left: self.call(service, action, payload, timeout=left),
                                                   retry, timeout), service, action)
        sent = self._record("call", service, action, payload)
        target = self._target(service, action)
        timeout, headers = self._headers(timeout, with_deadline=True)
        if timeout <= 0:
            raise CallTimeout(f"{service}.{action}: the deadline had already passed")
        with self._outermost():
            reply = self._deliver(target, "call", action, sent, headers)
        if reply is None:  # the deadline passed before or while the handler ran
            raise CallTimeout(f"{service}.{action}: no answer within {timeout:g}s")
        if reply.get("success"):
            return parsed(returns, reply.get("data"), service, action)
        if reply.get("error_type") == "CallTimeout":
            raise CallTimeout(f"{service}.{action}: {reply.get('error')}")
        raise envelope.remote_error(reply)

    def cast(self, service: str, action: str, payload: Mapping[str, Any] | None = None, *,
             timeout: float | None = None) -> None:
        sent = self._record("cast", service, action, payload)
        target = self._target(service, action)
        _, headers = self._headers(timeout, with_deadline=False)
        with self._outermost():
            self._later(lambda: self._deliver(target, "cast", action, sent, headers))

    def publish_event(self, name: str, payload: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> None:
        sent = self._record("event", None, name, payload)
        _, headers = self._headers(timeout, with_deadline=False)
        with self._outermost():
            for service in list(self.services.values()):
                for subscription in service.events.values():
                    if topic_matches(subscription.pattern, name):
                        self._later(functools.partial(self._deliver, service, "event", name, sent, headers,
                                                      subscription))

    def submit(self, service: str, action: str, payload: Mapping[str, Any] | None = None, *,
               timeout: float | None = None) -> str:
        sent = self._record("submit", service, action, payload)
        target = self._target(service, action)
        _, headers = self._headers(timeout, with_deadline=False)
        message_id = envelope.new_id()

        def run() -> None:
            reply = self._deliver(target, "submit", action, sent, headers, message_id=message_id)
            if reply is not None:
                self.replies[message_id] = reply

        with self._outermost():
            self._later(run)
        return message_id

    # --- routing -----------------------------------------------------------------------
    def _target(self, service: str, action: str) -> Service:
        target = self.services.get(service)
        if target is None:  # what the broker's basic.return tells the real client
            raise ServiceUnavailable(f"{service}.{action}: no queue is bound for "
                                     f"'request.{service}' (is {service} deployed?)")
        return target

    def _headers(self, timeout: float | None, *, with_deadline: bool) -> Tuple[float, dict]:
        """As RpcClient does: inside a handler, the trace id goes on and the deadline is
        the earlier of the handler's and this call's own."""
        timeout = self.timeout if timeout is None else timeout
        now = time.time()
        deadline = now + timeout
        call = current.get()
        headers: Dict[str, Any] = {}
        if call is not None:
            headers.update(trace_id=call.trace_id, parent_id=call.correlation_id)
            if call.deadline is not None and call.deadline < deadline:
                deadline, timeout = call.deadline, call.deadline - now
        else:
            headers["trace_id"] = envelope.new_id()
        if with_deadline:
            headers["deadline"] = round(deadline, 6)
        return timeout, headers

    def _later(self, delivery: Callable[[], Any]) -> None:
        self._local.queue.append(delivery)

    def _outermost(self) -> "_Outermost":
        return _Outermost(self._local)

    def _deliver(self, service: Service, kind: str, action: str, payload: dict, headers: dict,
                 subscription: Any = None, message_id: str | None = None) -> dict | None:
        """One message through the envelope to its handler, as the worker runs it; the reply
        envelope (as a dict) for calls and submits, None when there is none to send."""
        message_id = message_id or envelope.new_id()
        body = envelope.request_body(message_id=message_id, source=self.source, target=service.name,
                                     action=action, payload=payload, reply_to=None if kind in ("cast", "event")
                                     else "in-memory", headers=headers)
        try:
            request = envelope.decode_request(body, {"content_type": envelope.CONTENT_TYPE}, MAX_MESSAGE_BYTES)
        except BadMessage as exc:
            return self._failed(service, kind, action, payload, "BadMessage", exc.reason, message_id)
        trace_id = request.trace_id or message_id
        if kind == "event":
            function, policy = subscription.function, subscription.retry
            call = CallContext(service.name, action, message_id, trace_id, None)
        else:
            function, policy = service.find(action) or self._builtin(service, action), service.retry_policy(action)
            call = CallContext(service.name, action, message_id, trace_id, request.deadline)
            if function is None:
                return self._failed(service, kind, action, payload, "UnknownAction", f"Unknown action: {action}",
                                    message_id)
        for attempt in itertools.count(1):
            if call.deadline is not None and time.time() > call.deadline:
                return None  # the worker drops a request whose deadline passed; the caller timed out
            try:
                result = self._run(service, call, function, request.payload, kind, subscription)
            except Exception as exc:  # noqa: BLE001 - every handler error becomes an error reply
                if policy is not None and policy.retries(exc, attempt):
                    continue
                return self._failed(service, kind, action, payload, type(exc).__name__, str(exc), message_id,
                                    exc.errors if isinstance(exc, ValidationError) else None)
            if call.deadline is not None and time.time() > call.deadline:
                return None
            if kind in ("cast", "event"):
                return None
            try:
                reply = envelope.ok_reply(result, message_id)
            except (TypeError, ValueError) as exc:
                return self._failed(service, kind, action, payload, "TypeError",
                                    f"Result is not JSON serializable: {exc}", message_id)
            if len(reply) > MAX_REPLY_BYTES:
                return self._failed(service, kind, action, payload, ReplyTooLarge.__name__,
                                    f"Result is {len(reply)} bytes of JSON; replies are limited to {MAX_REPLY_BYTES}",
                                    message_id)
            return envelope.loads(reply)
        raise AssertionError("unreachable")

    def _run(self, service: Service, call: CallContext, function: Callable[[dict], Any], payload: dict, kind: str,
             subscription: Any) -> Any:
        fields = {"handler": subscription.name} if subscription is not None else {}

        def run() -> Any:
            current.set(call)
            logs.clear_request()
            logs.bind_request(service=call.service, action=call.action, correlation_id=call.correlation_id,
                              trace_id=call.trace_id, **fields)
            with client_installed(self.services, self):
                return function(payload)

        return contextvars.copy_context().run(run)  # nothing a handler sets outlives it

    def _failed(self, service: Service, kind: str, action: str, payload: dict, error_type: str, error: str,
                message_id: str, errors: list | None = None) -> dict | None:
        if kind in ("cast", "event"):  # nobody hears the error: dead-lettered, as the worker does
            log.warning("in-memory delivery dead-lettered", service=service.name, kind=kind, action=action,
                        error_type=error_type, error=error)
            with self._lock:
                self.dead_letters.append(DeadLetter(service.name, kind, action, payload, error_type, error))
            return None
        return envelope.loads(envelope.error_reply(error, error_type, message_id, errors))

    def _builtin(self, service: Service, action: str) -> Callable[[dict], Any] | None:
        if action != "ping":
            return None
        return lambda payload: {"instance_id": "in-memory", "service": service.name, "host": socket.gethostname(),
                                "pid": os.getpid(), "time": time.time(),
                                "uptime": round(time.time() - self._started, 3)}


class _Outermost:
    """Around each operation of the client: when the outermost one on this thread ends, the
    casts and events queued meanwhile (by it, and by the handlers they ran) are delivered,
    first in, first out."""

    def __init__(self, local: threading.local) -> None:
        self.local = local
        if not hasattr(local, "queue"):
            local.queue, local.depth = deque(), 0

    def __enter__(self) -> None:
        self.local.depth += 1

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        local = self.local
        if local.depth > 1 or exc_type is not None:
            local.depth -= 1
            if local.depth == 0:
                local.queue.clear()
            return
        pending: Deque[Callable[[], Any]] = local.queue
        try:
            while pending:
                pending.popleft()()
        finally:
            local.depth -= 1
            pending.clear()  # only left over when a delivery raised: nothing is carried into the next test
