"""Middleware: how features plug into workers and clients instead of patching them.

dramatiq's model: a base class whose hooks all do nothing; subclass it, override the hooks
you need, and pass instances to ``Worker(..., middleware=[...])`` or
``RpcClient(..., middleware=[...])`` (``AsyncRpcClient`` passes it on). :func:`add_default`
adds one to every worker and client created afterwards in this process (how
``--metrics-port`` or an OpenTelemetry instrumentor plugs in without user code); the
defaults run before the ones given.

The interface (stable: other features build on these names and fields)::

    class Middleware:
        # lifecycle (Worker only: the Collector takes no middleware), on the thread that starts/stops it
        def worker_starting(self, worker) -> None      # before connecting (may register handlers, e.g. ping)
        def worker_started(self, worker) -> None       # consuming
        def worker_stopping(self, worker) -> None      # warm stop begins
        def worker_stopped(self, worker) -> None       # connection closed (also after a start that failed)
        # worker, per delivery, on the handler thread
        def before_handle(self, delivery: Delivery) -> None
        def after_handle(self, delivery: Delivery, outcome: Outcome) -> None
        # worker, rarely: what after_handle was told could not be carried out (the reply or
        # the retry's copy could not be encoded) and the delivery was dead-lettered instead
        # (loop or handler thread)
        def outcome_amended(self, delivery: Delivery, old: Outcome, new: Outcome) -> None
        # worker, around-middleware (FastStream's consume_scope, a call_next chain), handler thread:
        # around what happens to a decoded delivery whose handler was found -> its Decision
        def consume_scope(self, call_next, delivery: Delivery) -> Decision
        # right around the handler, inside its retry policy -> the handler's result (or raise)
        def handle_scope(self, call_next, delivery: Delivery) -> Any
        # client, around-middleware, calling thread: around sending what a call, cast, event or
        # submit asked for (and, for a blocking call, waiting for its answer) -> what it returns
        def publish_scope(self, call_next, command: PublishCommand) -> Any
        # client, on the calling thread, before the message is written
        def before_publish(self, message: Outgoing) -> None
        # client, once a call has its answer / error / timeout (loop, timer or calling thread)
        # or was refused by the circuit breaker (calling thread), or a cast / event / submit
        # is confirmed or refused (calling thread)
        def after_settle(self, message: Outgoing, outcome: CallOutcome) -> None

    Delivery: service, kind ("call" | "cast" | "event"), action, handler, message_id,
        correlation_id, reply_to, exchange, routing_key, queue, redelivered, headers,
        body_headers, payload, body_size, started, state, cancelled
    Outcome (amqprpc.outcome): kind (OutcomeKind: REPLIED, FAILED, RETRIED, DEAD_LETTERED,
        REFUSED, EXPIRED, RECOUNTED, DONE), error_type, duration, dead_lettered
    Outgoing: kind ("call" | "cast" | "event" | "submit"), service, action, exchange,
        routing_key, message_id, correlation_id, headers (mutable), body_headers, started, state
    PublishCommand: kind, service, action, payload, timeout (mutable), retry, blocking,
        options, state
    CallOutcome (amqprpc.outcome): kind ("ok" | "error" | "timeout" | "unavailable" |
        "circuit_open" | "refused"), error_type, duration

A middleware whose ``consume_scope`` only has work for messages that carry a header (a
countdown's ``x-eta``, an ``idempotency_key``, a ``workflow``) says so in ``consume_gate``
(see :class:`Middleware`): the worker's chain then skips that scope for every other
message, so a feature a service does not use costs its messages nothing.

A call the client's CircuitBreaker refuses is never published: it gets no
``before_publish``, only ``after_settle`` with outcome kind ``circuit_open`` (on the calling
thread; its Outgoing's ``message_id`` is empty, its ``headers`` and ``body_headers`` too),
also when the breaker's fallback answered the caller instead.
``Worker.hooks.add(mw)`` (before it starts) adds one to a worker already built.

"Before" hooks run in list order, "after" hooks in reverse order. A hook that raises is
logged (logger ``amqprpc.middleware``, with the middleware's class name) and contained: it
never fails the call or the delivery. Hooks must be cheap: ``after_settle`` of a call runs
on the client's loop or timer thread, which serve every other call too. Only the hooks a
middleware overrides are called, and a worker or client without middleware calls none.

``before_handle`` and ``after_handle`` are called exactly once per delivery, on the same
handler thread, whatever happens to it (reply, error reply, retry, dead letter, refused
bad message, expired, redelivery recount, event done): ``delivery.state`` carries a
middleware's own data from one to the other (e.g. an OpenTelemetry span and its context
token). For a message that did not decode, ``action``, ``payload`` and ``body_headers``
are empty. The outcome is decided before the reply or forwarded copy is written; in the
rare case that it then cannot be encoded (a reply field or header that cannot travel), the
delivery is dead-lettered instead (error type ``UnsendableReply`` or ``UnencodableCopy``):
the worker's stats count it as dead-lettered, and ``outcome_amended`` tells middleware so,
after ``after_handle`` (the metrics count the dead letter).

The scopes: every delivery goes through one pipeline,
:class:`~amqprpc.server.dispatcher.Dispatcher` (its module doc draws it): screening (bad
and poisoned messages), deadline expiry and routing (unknown actions) first, then each
middleware's ``consume_scope`` in list order (the first given is the outermost), then the
retry policy, each ``handle_scope``, and the handler. Both chains are composed once per
worker: a worker whose middleware overrides no scope pays only for the built-in stages. A
scope returns ``call_next(delivery)`` or its own Decision, made with ``delivery.decide``
(``reply``, ``error``, ``error_reply``, ``ack``, ``later``, ``dead_letter``). A scope that
raises is logged and the delivery is dead-lettered (``WorkerError``): it never kills the
handler thread. The in-memory client (:mod:`amqprpc.testing.inmemory`) runs the same
dispatcher with the same middleware.

On the client, ``publish_scope`` is the same kind of chain around what the caller asked for
(:class:`PublishCommand`), composed once per client (:mod:`amqprpc.client.publishing`): the
client's retry (``call(..., retry=)``) is its outermost stage, the circuit breaker the next,
then each middleware's ``publish_scope`` in list order, so a scope runs once per attempt the
breaker lets through; ``before_publish`` and ``after_settle`` run inside, around each message
written. A client with no breaker and no ``publish_scope`` calls no stage at all. A scope
returns ``call_next(command)`` (the call's data; for ``call_async`` a Future, which the scope
must not wait on; the message id of a cast or submit) or raises (the caller gets it).

Validation of payloads needs no middleware: it wraps the handler where it is registered.

The response Collector runs no middleware: it has no service, handlers or deliveries in
this model (the lifecycle hooks of the middleware that exist read ``worker.service``:
metrics, registry presence, ping, the shared client), and the process defaults
(``--metrics-port``) would then be run against it too. Its counts are in ``Collector.stats``.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence, Tuple

from amqprpc import logs
from amqprpc.outcome import CallOutcome, Outcome

if TYPE_CHECKING:
    from amqprpc.middleware.view import WorkerView

log = logs.get_logger("amqprpc.middleware")

_EMPTY: Mapping[str, Any] = {}


class Delivery:
    """One consumed message as a worker's middleware sees it (read-only but for ``state``).

    ``service`` name; ``kind`` "call" (a reply is expected), "cast" or "event"; ``action``
    the action or event name from the envelope (None if it did not decode); ``handler`` the
    name the handler that runs it is registered under (the bounded label: an event handler's
    name, a call's snake_case action; None when no handler runs it); ``message_id``,
    ``correlation_id``, ``reply_to``; ``exchange``, ``routing_key``, ``queue`` where it came
    from; ``redelivered``; ``headers`` the AMQP application_headers (W3C ``traceparent``
    lives here); ``body_headers`` the envelope's headers (``trace_id``, ``deadline``...);
    ``payload``; ``body_size`` in bytes; ``started`` (``time.perf_counter()`` when taken);
    ``state`` a dict for middleware's own per-delivery data; ``trace_id`` the id the worker
    binds to the handler's log lines and passes on to its nested calls and events (the
    envelope's ``trace_id``, else the correlation or message id): the one field besides
    ``state`` that ``before_handle`` may set (OpenTelemetry puts its trace id there);
    ``cancelled`` True once the message was revoked while its handler runs (raised by
    :class:`~amqprpc.middleware.revoke.RevokeChecks`; the handler reads it as
    ``current_call().cancelled``).
    """

    __slots__ = ("service", "kind", "action", "handler", "message_id", "correlation_id", "reply_to", "exchange",
                 "routing_key", "queue", "redelivered", "headers", "body_headers", "payload", "body_size",
                 "started", "state", "trace_id", "message", "request", "function", "retry", "deadline", "worker",
                 "result", "decide", "cancelled")

    def __init__(self, service: str, kind: str, queue: str, properties: Mapping[str, Any],
                 delivery_info: Mapping[str, Any], body_size: int, started: float) -> None:
        self.service = service
        self.kind = kind
        self.queue = queue
        self.action: str | None = None
        self.handler: str | None = None
        self.message_id: str | None = properties.get("message_id")
        self.correlation_id: str | None = properties.get("correlation_id")
        self.reply_to: str | None = properties.get("reply_to")
        self.exchange: str = delivery_info.get("exchange", "")
        self.routing_key: str = delivery_info.get("routing_key", "")
        self.redelivered: bool = bool(delivery_info.get("redelivered"))
        self.headers: Mapping[str, Any] = properties.get("application_headers") or _EMPTY
        self.body_headers: Mapping[str, Any] = _EMPTY
        self.payload: Any = None
        self.body_size = body_size
        self.started = started
        self.state: dict[str, Any] = {}
        self.trace_id: str | None = None
        self.cancelled = False
        # What the dispatcher (amqprpc.server.dispatcher) fills in for the scopes.
        self.message: Any = None
        self.request: Any = None
        self.function: Callable[[Any], Any] | None = None
        self.retry: Any = None
        self.deadline: float | None = None
        self.worker: Any = None
        self.result: Any = None
        self.decide: Any = None

    def __repr__(self) -> str:
        return f"<Delivery {self.kind} {self.service}.{self.action} {self.message_id}>"


class Outgoing:
    """One message a client is about to send, as its middleware sees it.

    ``kind`` "call", "cast", "event" or "submit"; ``service`` (None for events); ``action``
    (or the event name); ``exchange`` and ``routing_key`` it is published to;
    ``message_id``, ``correlation_id`` (None for casts and events); ``headers`` a MUTABLE
    dict that becomes the AMQP message's application_headers (inject ``traceparent`` here);
    ``body_headers`` the envelope's headers (``trace_id``, ``deadline``...): the body is built
    after ``before_publish``, which may set ``trace_id`` (OpenTelemetry puts its trace id there);
    ``started`` ``time.monotonic()``; ``state`` a dict for middleware's own data.
    """

    __slots__ = ("kind", "service", "action", "exchange", "routing_key", "message_id", "correlation_id", "headers",
                 "body_headers", "started", "state")

    def __init__(self, kind: str, service: str | None, action: str, exchange: str, routing_key: str,
                 message_id: str, correlation_id: str | None, body_headers: Mapping[str, Any]) -> None:
        self.kind = kind
        self.service = service
        self.action = action
        self.exchange = exchange
        self.routing_key = routing_key
        self.message_id = message_id
        self.correlation_id = correlation_id
        self.headers: dict[str, Any] = {}
        self.body_headers = body_headers
        self.started = time.monotonic()
        self.state: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<Outgoing {self.kind} {self.service}.{self.action} {self.message_id}>"


class PublishCommand:
    """What a caller asked a client to send, as ``publish_scope`` sees it (FastStream's
    PublishCommand), before any message is built.

    ``kind`` "call", "cast", "event" or "submit"; ``service`` (None for events); ``action``
    (or the event name); ``payload`` as given; ``timeout`` the seconds this attempt may take
    (the client's retry sets it for each attempt; a scope may lower it); ``retry`` the call's
    :class:`~amqprpc.retry.Retry` (None: not retried); ``blocking`` False for ``call_async``
    (``call_next`` then returns a Future); ``options`` the method's other keyword arguments
    (``idempotency_key``, ``priority``, ``countdown``...: mutable, read when the message is
    built); ``state`` a dict for middleware's own data.
    """

    __slots__ = ("kind", "service", "action", "payload", "timeout", "retry", "blocking", "options", "state")

    def __init__(self, kind: str, service: str | None, action: str, payload: Any, timeout: float, retry: Any = None,
                 blocking: bool = True, options: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.service = service
        self.action = action
        self.payload = payload
        self.timeout = timeout
        self.retry = retry
        self.blocking = blocking
        self.options: dict[str, Any] = {} if options is None else options
        self.state: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<PublishCommand {self.kind} {self.service}.{self.action}>"


#: Where a consume_scope has work: (field, key) pairs, field "headers" or "body_headers".
Gate = Tuple[Tuple[str, str], ...]
GATE_FIELDS = ("headers", "body_headers")


class Middleware:
    """Base class: every hook does nothing. Override the ones you need (see the module doc).

    ``consume_gate``: where this middleware's ``consume_scope`` has work, as ``(field, key)``
    pairs, ``field`` one of ``"headers"`` (the AMQP application headers) and
    ``"body_headers"`` (the envelope's); e.g. ``(("body_headers", "idempotency_key"),)``.
    Empty (the default): the scope runs for every delivery. Set: the worker's chain skips
    the scope for a delivery that carries none of those keys, so it must only call on for
    such a delivery (a delivery with any gated key of any middleware runs the whole chain,
    each scope in its place). Honoured where it is declared on the class that defines the
    ``consume_scope`` or below (a subclass that overrides ``consume_scope`` declares its own).
    """

    consume_gate: ClassVar[Gate] = ()

    def worker_starting(self, worker: WorkerView) -> None:
        pass

    def worker_started(self, worker: WorkerView) -> None:
        pass

    def worker_stopping(self, worker: WorkerView) -> None:
        pass

    def worker_stopped(self, worker: WorkerView) -> None:
        pass

    def before_handle(self, delivery: Delivery) -> None:
        pass

    def after_handle(self, delivery: Delivery, outcome: Outcome) -> None:
        pass

    def outcome_amended(self, delivery: Delivery, old: Outcome, new: Outcome) -> None:
        pass

    def consume_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        """Around everything that happens to a decoded delivery whose handler was found:
        return ``call_next(delivery)`` (its Decision), or a Decision of your own from
        ``delivery.decide`` without calling on (revoked, duplicate, over a rate limit)."""
        return call_next(delivery)

    def handle_scope(self, call_next: Callable[[Delivery], Any], delivery: Delivery) -> Any:
        """Right around the handler, inside its retry policy: return its result or raise
        (what you raise follows the retry policy, as the handler's own exceptions do)."""
        return call_next(delivery)

    def publish_scope(self, call_next: Callable[[PublishCommand], Any], command: PublishCommand) -> Any:
        """Around sending what a caller asked for (client, calling thread): return
        ``call_next(command)`` or raise. See the module doc."""
        return call_next(command)

    def before_publish(self, message: Outgoing) -> None:
        pass

    def after_settle(self, message: Outgoing, outcome: CallOutcome) -> None:
        pass


HOOKS = ("worker_starting", "worker_started", "worker_stopping", "worker_stopped", "before_handle", "after_handle",
         "outcome_amended", "consume_scope", "handle_scope", "publish_scope", "before_publish", "after_settle")
_AFTER = frozenset({"worker_stopping", "worker_stopped", "after_handle", "outcome_amended", "after_settle"})

#: Added to every Worker and RpcClient created from now on, before their own (see :func:`add_default`).
default: list[Middleware] = []


def add_default(middleware: Middleware) -> None:
    """Add ``middleware`` to every worker and client created after this call in this
    process (once: adding the same object again does nothing)."""
    if not any(existing is middleware for existing in default):
        default.append(middleware)


def remove_default(middleware: Middleware) -> None:
    """Undo :func:`add_default` (for workers and clients created afterwards)."""
    default[:] = [existing for existing in default if existing is not middleware]


def _gate(middleware: Middleware) -> Gate:
    """The ``consume_gate`` of ``middleware`` when it is declared where its consume_scope is
    (or below); () otherwise."""
    mro = type(middleware).__mro__
    gate = type(middleware).consume_gate
    if not gate:
        return ()
    for field, key in gate:
        if field not in GATE_FIELDS or not isinstance(key, str):
            raise ValueError(f"{type(middleware).__name__}.consume_gate: ({field!r}, {key!r}) is not "
                             f"(one of {GATE_FIELDS}, a key)")
    scope_owner = next(cls for cls in mro if "consume_scope" in vars(cls))
    gate_owner = next(cls for cls in mro if "consume_gate" in vars(cls))
    return gate if issubclass(gate_owner, scope_owner) else ()


class Hooks:
    """The hooks of one worker's or client's middleware list, resolved once: for each hook,
    the bound methods of the middleware that override it, in calling order. Calling a
    hook nobody overrides is a check of an empty tuple."""

    worker_starting: tuple[Callable[[WorkerView], None], ...]
    worker_started: tuple[Callable[[WorkerView], None], ...]
    worker_stopping: tuple[Callable[[WorkerView], None], ...]
    worker_stopped: tuple[Callable[[WorkerView], None], ...]
    before_handle: tuple[Callable[[Delivery], None], ...]
    after_handle: tuple[Callable[[Delivery, Outcome], None], ...]
    outcome_amended: tuple[Callable[[Delivery, Outcome, Outcome], None], ...]
    consume_scope: tuple[Callable[[Callable[[Delivery], Any], Delivery], Any], ...]
    consume_gates: tuple[Gate, ...]  # each consume_scope's gate (() when it has none)
    handle_scope: tuple[Callable[[Callable[[Delivery], Any], Delivery], Any], ...]
    publish_scope: tuple[Callable[[Callable[[PublishCommand], Any], PublishCommand], Any], ...]
    before_publish: tuple[Callable[[Outgoing], None], ...]
    after_settle: tuple[Callable[[Outgoing, CallOutcome], None], ...]

    def __init__(self, middleware: Sequence[Middleware] | None = None, *, defaults: bool = True,
                 builtin: Sequence[Middleware] = ()) -> None:
        self.middleware: list[Middleware] = [*builtin, *(default if defaults else ()), *(middleware or ())]
        self._resolve()

    def add(self, middleware: Middleware) -> None:
        """Append one more (before the worker or client starts serving: the tuples are
        replaced, not locked)."""
        self.middleware.append(middleware)
        self._resolve()

    def _resolve(self) -> None:
        for name in HOOKS:
            bound = [getattr(each, name) for each in self.middleware
                     if getattr(type(each), name, None) is not getattr(Middleware, name)]
            if name in _AFTER:
                bound.reverse()
            setattr(self, name, tuple(bound))
        self.consume_gates = tuple(_gate(each) for each in self.middleware
                                   if type(each).consume_scope is not Middleware.consume_scope)

    def __bool__(self) -> bool:
        return bool(self.middleware)

    def run(self, hooks: tuple[Callable[..., None], ...], *args: Any) -> None:
        """Call each of ``hooks`` (one of this object's tuples) with ``args``; log and
        contain what they raise."""
        for hook in hooks:
            try:
                hook(*args)
            except Exception:  # noqa: BLE001 - a middleware never fails the call or delivery
                owner = getattr(hook, "__self__", hook)
                log.exception("middleware hook failed", middleware=type(owner).__name__,
                              hook=getattr(hook, "__name__", "?"))
