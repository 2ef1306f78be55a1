"""Testing one service's handlers without a broker: :func:`worker_factory` and :class:`FakeClient`.

As nameko's ``worker_factory`` does for a service class: the handlers run through the
worker's own dispatcher (JSON in and out, the call context set, retry policies, expiry),
with ``service.client`` replaced by a :class:`FakeClient` that records the calls, casts and
events the handler sends and answers calls from canned answers. The handler's own
exception reaches the test. :mod:`amqprpc.testing.inmemory` wires several services together.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

from amqprpc.wire import envelope
from amqprpc.client.countdown import check_priority, delay_of
from amqprpc.client.proxy import ServiceProxy
from amqprpc.contracts import parse, to_payload
from amqprpc.errors import CallTimeout
from amqprpc.middleware import Delivery, Hooks, Middleware
from amqprpc.outcome import OutcomeKind
from amqprpc.server.dispatcher import Decision
from amqprpc.server.events import topic_matches
from amqprpc.retry import Retry
from amqprpc.service import Service, client_installed
from amqprpc.testing.dispatch import carry_out, local_dispatcher, request_message

class Sent(NamedTuple):
    """One message a client was asked to send. Compares equal to a plain tuple:
    ``assert fake.events == [("event", None, "order.created", {...})]``."""

    kind: str  # "call", "cast", "event" or "submit"
    service: Optional[str]  # None for events
    action: str  # the action, or the event's name
    payload: dict[str, Any]  # as the receiver sees it (after a JSON round trip)


def plain(payload: Any) -> Any:
    """A payload as the real client sends it: dicts as they are, models and dataclasses
    dumped to JSON types (:func:`amqprpc.contracts.to_payload`)."""
    return {} if payload is None else to_payload(payload)


def parsed(returns: Any, data: Any, service: str, action: str) -> Any:
    """``data`` parsed into ``returns`` (``call(..., returns=User)``), as the real client does."""
    return data if returns is None else parse(returns, data, f"{service}.{action}")


def wire(value: Any) -> Any:
    """``value`` as the other side of the wire sees it (JSON: tuples become lists, keys
    strings). Raises TypeError/ValueError for what JSON cannot carry, as the real client does."""
    return envelope.loads(envelope.dumps(value))


class Recorder:
    """What both clients share: the record of what was sent."""

    def __init__(self, source: str, timeout: float) -> None:
        self.source = source
        self.timeout = timeout
        self.sent: List[Sent] = []
        self._lock = threading.Lock()

    def _record(self, kind: str, service: Optional[str], action: str,
                payload: Mapping[str, Any] | None) -> dict[str, Any]:
        sent: dict[str, Any] = wire(plain(payload))
        with self._lock:
            self.sent.append(Sent(kind, service, action, sent))
        return sent

    def _of(self, kind: str) -> List[Sent]:
        return [sent for sent in self.sent if sent.kind == kind]

    @property
    def calls(self) -> List[Sent]:
        return self._of("call")

    @property
    def casts(self) -> List[Sent]:
        return self._of("cast")

    @property
    def events(self) -> List[Sent]:
        return self._of("event")

    @property
    def submits(self) -> List[Sent]:
        return self._of("submit")

    def proxy(self, service: str, *, timeout: float | None = None) -> ServiceProxy:
        # A Recorder has no call of its own; the subclasses that are ever proxied do.
        return ServiceProxy(self, service, timeout)  # type: ignore[arg-type]

    def call_async(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
                   callback: Callable[[Future[Any]], Any] | None = None, returns: Any = None,
                   idempotency_key: str | None = None) -> Future[Any]:
        """The call, made now; a Future already done (``callback`` runs at once, on this
        thread), with a ``message_id`` as the real one has."""
        future: Future[Any] = Future()
        future.message_id = envelope.new_id()  # type: ignore[attr-defined]  # as RpcClient.call_async's
        try:
            future.set_result(self.call(service, action, payload, timeout=timeout,  # type: ignore[attr-defined]
                                        returns=returns, idempotency_key=idempotency_key))
        except Exception as exc:  # noqa: BLE001 - the Future carries it, as the real one does
            future.set_exception(exc)
        if callback is not None:
            callback(future)
        return future

    def close(self) -> None:
        """Nothing to close; here so that code written for RpcClient runs unchanged."""

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class FakeClient(Recorder):
    """Stands in for ``service.client`` in a handler test (see :func:`worker_factory`).

    Records every call, cast, event and submit in :attr:`sent` (and by kind in
    :attr:`calls`, :attr:`casts`, :attr:`events`, :attr:`submits`) as :class:`Sent`
    tuples. A call is answered from :attr:`answers`, keyed by ``(service, action)``: a
    value (returned after a JSON round trip), an exception (raised: give a
    :class:`~amqprpc.errors.RemoteError` to play a remote failure) or a function of the
    payload. A call nobody gave an answer for raises LookupError, naming it.
    """

    def __init__(self, answers: Mapping[Tuple[str, str], Any] | None = None, *, source: str = "fake-client",
                 timeout: float = 5.0) -> None:
        super().__init__(source, timeout)
        self.answers: Dict[Tuple[str, str], Any] = dict(answers or {})

    def answer(self, service: str, action: str, answer: Any) -> "FakeClient":
        """Answer calls of ``service.action`` with ``answer`` (see the class); chainable."""
        self.answers[(service, action)] = answer
        return self

    def call(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
             retry: Retry | None = None, returns: Any = None, idempotency_key: str | None = None) -> Any:
        sent = self._record("call", service, action, payload)
        try:
            answer = self.answers[(service, action)]
        except KeyError:
            raise LookupError(f"FakeClient: no answer for {service}.{action}; give one with "
                              f"client.answer({service!r}, {action!r}, ...)") from None
        if isinstance(answer, BaseException) or (isinstance(answer, type) and issubclass(answer, BaseException)):
            raise answer
        return parsed(returns, wire(answer(sent) if callable(answer) else answer), service, action)

    def cast(self, service: str, action: str, payload: Mapping[str, Any] | None = None, *,
             timeout: float | None = None, idempotency_key: str | None = None, countdown: float | None = None,
             eta: Any = None, priority: int | None = None, message_id: str | None = None,
             headers: Mapping[str, Any] | None = None) -> str:
        """Recorded (countdown, eta and priority checked as RpcClient checks them, not kept)."""
        delay_of(countdown, eta)
        check_priority(priority)
        self._record("cast", service, action, payload)
        return message_id or envelope.new_id()

    def publish_event(self, name: str, payload: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> None:
        self._record("event", None, name, payload)

    def submit(self, service: str, action: str, payload: Mapping[str, Any] | None = None, *,
               timeout: float | None = None, idempotency_key: str | None = None, countdown: float | None = None,
               eta: Any = None, priority: int | None = None) -> str:
        delay_of(countdown, eta)
        check_priority(priority)
        self._record("submit", service, action, payload)
        return envelope.new_id()


class Harness:
    """One service's handlers run as its worker would, with ``service.client`` a
    :class:`FakeClient` (what :func:`worker_factory` returns).

    ``harness.call("get_user", {"user_id": "u1"})`` or ``harness.get_user(user_id="u1")``
    runs the action's handler (camelCase names accepted) with the payload as JSON delivers
    it and the call context set (:func:`amqprpc.current_call`: a fresh trace id, a deadline
    ``timeout`` seconds away), and returns its result as JSON returns it; the handler's own
    exception reaches the test. ``harness.event("order.created", {...})`` runs every event
    handler of the service whose pattern matches, and says how many ran.
    """

    def __init__(self, service: Service, client: Any) -> None:
        self.service = service
        self.client = client
        self._source = f"worker-factory.{service.name}"

    def call(self, action: str, payload: Mapping[str, Any] | None = None, *, timeout: float = 5.0) -> Any:
        headers = {"trace_id": envelope.new_id(), "deadline": round(time.time() + timeout, 6)}
        decision = self._dispatch("call", action, payload, headers)
        if decision.body is None:
            raise CallTimeout(f"{self.service.name}.{action}: the deadline passed before it ran")
        reply = envelope.loads(decision.body)
        if reply.get("success"):
            return reply.get("data")
        raise envelope.remote_error(reply)

    def event(self, name: str, payload: Mapping[str, Any] | None = None) -> int:
        matching = [sub for sub in self.service.events.values() if topic_matches(sub.pattern, name)]
        message_id = envelope.new_id()
        for subscription in matching:
            self._dispatch("event", name, payload, {"trace_id": message_id}, subscription.name, message_id)
        return len(matching)

    def _dispatch(self, kind: str, action: str, payload: Mapping[str, Any] | None, headers: dict[str, Any],
                  handler: str | None = None, message_id: str | None = None) -> Decision:
        """Through the worker's own dispatcher; the handler's own exception, once its retry
        policy gave up, is raised here (not turned into an error reply)."""
        dispatcher, tags = local_dispatcher(self.service, Hooks([_Raised()], defaults=False), self)
        message = request_message(message_id=message_id or envelope.new_id(), source=self._source,
                                  service=self.service.name, kind=kind, action=action, payload=plain(payload),
                                  headers=headers, consumer_tag=tags.get(handler) if handler else None)
        decision = carry_out(dispatcher, message, self._installed)
        raised = decision.delivery.state.get(_Raised.KEY) if decision.delivery is not None else None
        if raised is not None and decision.outcome.kind in (OutcomeKind.FAILED, OutcomeKind.DEAD_LETTERED):
            raise raised
        return decision

    def _installed(self, dispatch: Callable[[], Decision]) -> Decision:
        with client_installed([self.service.name], self.client):
            return dispatch()

    def __getattr__(self, action: str) -> Callable[..., Any]:
        if action.startswith("_") or self.service.find(action) is None:
            raise AttributeError(f"{self.service.name} has no action {action!r}")
        return lambda payload=None, **kwargs: self.call(action, {**plain(payload), **kwargs} if kwargs else payload)


class _Raised(Middleware):
    """Keeps what the handler raised, for :class:`Harness` to raise it in the test."""

    KEY = "amqprpc.testing.raised"

    def handle_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        try:
            return call_next(delivery)
        except Exception as exc:
            delivery.state[self.KEY] = exc
            raise


def worker_factory(service: Service | Callable[..., Service], client: Any = None, **deps: Any) -> Harness:
    """A :class:`Harness` running ``service``'s handlers with ``service.client`` replaced by
    ``client`` (default: a new :class:`FakeClient`; pass one with canned answers, or an
    :class:`InMemoryClient`), as nameko's ``worker_factory`` does for a service class.

    ``service`` is a Service, or a function building one (the shop's ``build``), which is
    then called with ``deps``: ``worker_factory(order_service.build, shop=test_shop)`` gets
    a service of its own whose dependencies are the test's.
    """
    if not isinstance(service, Service):
        service = service(**deps)
    elif deps:
        raise TypeError(f"worker_factory: {', '.join(deps)} given, but {service.name} is built already; "
                        f"pass the function that builds it")
    return Harness(service, FakeClient(source=service.name) if client is None else client)
