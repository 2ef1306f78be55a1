"""RpcClient: thread-safe calls, casts and events over one connection.

Any number of threads may call at once. The caller's thread builds and serializes the
request; the loop thread (:class:`~amqprpc.transport.ioloop.AmqpLoop`) publishes it, receives the
reply on the client's one long-lived reply queue and resolves the caller's Future.
Deadlines fire on a timer thread of the client's own (:mod:`amqprpc.transport.deadlines`) and
writes never block (:mod:`amqprpc.transport.framewriter`), so no caller waits without a bound,
whatever the network or the loop thread does.
"""
from __future__ import annotations

import heapq
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from typing import Any, Callable, Sequence

import amqp

from amqprpc import context, logs
from amqprpc.wire import envelope
from amqprpc.caller import Caller
from amqprpc.client.breaker import CircuitBreaker
from amqprpc.config import broker_url as default_broker_url
from amqprpc.config import redact
from amqprpc.transport.deadlines import Timer
from amqprpc.errors import CallTimeout, CircuitOpen, ConnectionLost, PublishRefused, RemoteError, ServiceUnavailable
from amqprpc.transport.framehandler import UndecodableMessage
from amqprpc.transport.ioloop import (
    UNENCODABLE, AmqpLoop, channel_refused, close_quietly, open_confirm_channel, publish,
)
from amqprpc.transport.link import describe
from amqprpc.middleware import Hooks, Middleware, Outgoing
from amqprpc.middleware.observability import automatic
from amqprpc.outcome import CIRCUIT_OPEN, ERROR, OK, REFUSED, TIMEOUT, UNAVAILABLE, CallOutcome
from amqprpc.retry import PUBLISH_RETRY, Retry, call_with_retry
from amqprpc.wire.ids import snake_case
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology

log = logs.get_logger("amqprpc.client")

# How much longer than the call's own timeout a caller waits on its Future before it
# gives up on the timer thread (which fails every call at its deadline) and raises itself.
_GRACE = 0.25


class RpcClient:
    """Calls services over RabbitMQ.

    Parameters: ``source`` names this caller in envelopes and in its reply queue;
    ``broker_url`` defaults to ``AMQPRPC_BROKER_URL``; ``timeout`` is the default call
    timeout in seconds; ``heartbeat``, ``connect_timeout`` and ``reconnect_cap`` (the
    longest wait between reconnect attempts) in seconds; ``middleware`` hooks around what it
    sends (:mod:`amqprpc.middleware`), after the process's defaults; ``redis_url`` where
    :meth:`revoke` stores revocations (default ``AMQPRPC_REDIS_URL``; used only by it).
    One lifecycle: connects at construction (raises :class:`ServiceUnavailable` if it
    cannot), :meth:`close` (or the ``with`` block) ends it. Its connection is an
    :class:`~amqprpc.transport.ioloop.AmqpLoop` it holds, not one it is.
    """

    def __init__(self, source: str = "amqprpc-client", *, broker_url: str | None = None, timeout: float = 5.0,
                 topology: Topology = DEFAULT_TOPOLOGY, heartbeat: float = 30.0, connect_timeout: float = 5.0,
                 breaker: CircuitBreaker | None = None, middleware: Sequence[Middleware] | None = None,
                 reconnect_cap: float = 10.0, redis_url: str | None = None):
        self.hooks = Hooks(middleware, builtin=automatic(middleware or ()))
        self._loop = AmqpLoop(default_broker_url(broker_url), name=f"amqprpc-client-{source}", heartbeat=heartbeat,
                              connect_timeout=connect_timeout, reconnect_cap=reconnect_cap,
                              on_connected=self._on_connected, on_disconnected=self._on_disconnected)
        self.url = self._loop.url
        # Callers publish under the loop's write lock themselves (see _send_call).
        self._write_lock = self._loop.write_lock
        self.source = source
        self.timeout = timeout
        self.breaker = breaker
        self.topology = topology
        self.redis_url = redis_url
        self._revocations: Any = None  # RevocationStore, made by the first revoke()
        self.reply_queue = topology.reply_queue(source)
        # Publishes go on two confirm channels of their own (calls; casts, events and
        # submits), replies arrive on a third: a channel the broker keeps refusing is
        # replaced without touching the reply consumer (the reply queue is auto-delete).
        self._call_channel: amqp.Channel | None = None
        self._call_tags: dict[int, str] = {}  # delivery tag on the call channel -> correlation id
        self._call_seq = 0
        self._call_opened = 0.0
        self._confirm_channel: amqp.Channel | None = None
        self._confirm_opened = 0.0
        self.channels_replaced = {"call": 0, "confirm": 0}  # after the broker kept refusing them
        self._pending: dict[str, tuple[Future[Any], str, str, float]] = {}  # correlation id -> call
        self._deadlines: list[tuple[float, str]] = []  # heap of (monotonic deadline, correlation id)
        self._calls_lock = threading.Lock()  # the two above, between callers, loop and timer
        self._timer = Timer(self._expire, name=f"amqprpc-deadlines-{source}")
        self._confirms: dict[int, tuple[Future[Any], str, str]] = {}  # delivery tag -> publish
        self._unroutable: set[str] = set()
        self._publish_seq = 0
        self._declared: dict[str, int] = {}  # queue name -> connection generation it was declared on
        self._callbacks: ThreadPoolExecutor | None = None
        self._closed = False
        try:
            self._loop.start()
        except Exception as exc:  # noqa: BLE001 - any connect failure is "unavailable" to a caller
            raise ServiceUnavailable(f"cannot connect to broker {redact(self.url)}: {redact(str(exc))}") from None

    # --- public API --------------------------------------------------------------------
    def call(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
             retry: Retry | None = None, returns: Any = None, idempotency_key: str | None = None) -> Any:
        """Call ``action`` on ``service`` and return its ``data``.

        ``payload``: a dict, or a pydantic model or dataclass (sent as its JSON dump).
        ``returns``: a type (a pydantic model, a dataclass, ``list[User]``...) to parse the
        data into; data that does not fit raises :class:`~amqprpc.errors.ValidationError`.
        Raises RemoteError (the handler failed; a payload the handler's types refused is a
        RemoteValidationError, ``error_type`` "ValidationError", with the failing fields in
        ``.errors``), CallTimeout (no reply within ``timeout``
        seconds), ServiceUnavailable (no queue for the service, or no broker) or
        CircuitOpen (the breaker refused; nothing was sent).
        ``retry``: for idempotent actions only, re-send after CallTimeout/ServiceUnavailable
        with backoff (never after CircuitOpen); ``timeout`` then bounds all attempts together.
        ``idempotency_key``: the service runs the handler at most once per key within its
        dedup window (24 h); a repeat gets the first call's reply (waiting for it while the
        first still runs). Every retry attempt carries the same key, which makes ``retry``
        safe for any action. A Revoked error (:class:`~amqprpc.errors.Revoked`) says the
        request was revoked before or while it ran.
        """
        timeout = self.timeout if timeout is None else timeout
        key = idempotency_key
        if retry is not None:
            data = call_with_retry(lambda left: self.call(service, action, payload, timeout=left, idempotency_key=key),
                                   retry, timeout)
        elif self.breaker is not None:
            data = self.breaker.call(service, action, payload,
                                     lambda: self._call(service, action, payload, timeout, key),
                                     on_reject=self._refused if self.hooks.after_settle else None)
        else:
            data = self._call(service, action, payload, timeout, key)
        return data if returns is None else _parse(returns, data, service, action)

    def _call(self, service: str, action: str, payload: Any, timeout: float, idempotency_key: str | None = None) -> Any:
        future = self._call_async(service, action, payload, timeout, idempotency_key)
        try:
            return future.result(timeout + _GRACE)
        except FutureTimeout:
            raise CallTimeout(
                f"{service}.{action}: no answer within {timeout}s (its deadline timer was late)") from None

    def call_async(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
                   callback: Callable[[Future[Any]], Any] | None = None, returns: Any = None,
                   idempotency_key: str | None = None) -> Future[Any]:
        """Send a call and return a Future of its ``data`` at once.

        ``callback(future)`` runs when it resolves, on a separate callback thread (so a
        callback may itself make calls). ``payload``, ``returns`` and ``idempotency_key`` as
        for :meth:`call` (the data is parsed on the callback thread, never on the I/O loop's).
        The Future's ``message_id`` attribute is the request's message id (for :meth:`revoke`;
        None when the circuit breaker refused and nothing was sent).
        """
        if self.breaker is not None:
            future = self.breaker.call_async(service, action, payload,
                                             lambda: self._call_async(service, action, payload, timeout,
                                                                      idempotency_key),
                                             self._run_callback,
                                             on_reject=self._refused if self.hooks.after_settle else None)
        else:
            future = self._call_async(service, action, payload, timeout, idempotency_key)
        message_id = getattr(future, "message_id", None)
        if returns is not None:
            future = self._parsed(future, returns, service, action)
        future.message_id = message_id  # type: ignore[attr-defined]  # documented on the Future
        if callback is not None:
            future.add_done_callback(self._run_callback(callback))
        return future

    def _parsed(self, future: Future[Any], returns: Any, service: str, action: str) -> Future[Any]:
        """A Future of ``future``'s data parsed into ``returns``."""
        parsed: Future[Any] = Future()

        def parse(done: Future[Any]) -> None:
            error = done.exception()
            if error is not None:
                _settle(parsed, exception=error)
                return
            try:
                _settle(parsed, result=_parse(returns, done.result(), service, action))
            except Exception as exc:  # noqa: BLE001 - ValidationError, or a type pydantic cannot build
                _settle(parsed, exception=exc)

        future.add_done_callback(self._run_callback(parse))
        return parsed

    def _call_async(self, service: str, action: str, payload: Any,
                    timeout: float | None, idempotency_key: str | None = None) -> Future[Any]:
        timeout, headers = self._deadline(timeout, idempotency_key=idempotency_key)
        message_id = envelope.new_id()
        hooks = self.hooks
        outgoing = None
        if hooks.before_publish or hooks.after_settle:  # before the body is built: a hook may set its trace_id
            outgoing = self._outgoing("call", service, action, self.topology.service_exchange,
                                      self.topology.request_key(service), message_id, message_id, headers)
        if type(payload) is not dict:  # models, dataclasses, None: converted (a dict, the usual case, is not)
            payload = _payload(payload)
        try:
            body = envelope.request_body(message_id=message_id, source=self.source, target=service, action=action,
                                         payload=payload, reply_to=self.reply_queue.name, headers=headers)
        except Exception as exc:  # a payload JSON cannot carry: what the hooks began for it ends too
            self._unsent(outgoing, exc)
            raise
        message = amqp.Message(body, content_type=envelope.CONTENT_TYPE, message_id=message_id,
                               correlation_id=message_id, reply_to=self.reply_queue.name, delivery_mode=2,
                               expiration=str(max(1, int(timeout * 1000))))
        future: Future[Any] = Future()
        future.message_id = message_id  # type: ignore[attr-defined]  # see call_async
        if outgoing is not None:
            if outgoing.headers:
                message.properties["application_headers"] = outgoing.headers
            if hooks.after_settle:
                future.add_done_callback(lambda done: self._settled(outgoing, _failure_of(done)))
        if timeout <= 0:
            future.set_exception(CallTimeout(f"{service}.{action}: the deadline had already passed"))
            return future
        self._register(message_id, future, service, action, timeout)
        self._send_call(message_id, message, service, action, future)
        return future

    def cast(self, service: str, action: str, payload: Any = None, *,
             timeout: float | None = None, idempotency_key: str | None = None) -> str:
        """Send a request that gets no reply. Returns its message id (for :meth:`revoke`) once
        the broker confirmed it stored the message; raises ServiceUnavailable if no queue
        takes it. ``idempotency_key`` as for :meth:`call`: a repeat is acked unrun."""
        timeout, headers = self._deadline(timeout, with_deadline=False, idempotency_key=idempotency_key)
        message_id = envelope.new_id()
        exchange, routing_key = self.topology.service_exchange, self.topology.request_key(service)
        outgoing = self._outgoing("cast", service, action, exchange, routing_key, message_id, None,
                                  headers) if self._observed else None
        try:
            body = envelope.request_body(message_id=message_id, source=self.source, target=service, action=action,
                                         payload=_payload(payload), reply_to=None, headers=headers)
        except Exception as exc:  # a payload JSON cannot carry: what the hooks began for it ends too
            self._unsent(outgoing, exc)
            raise
        self._confirmed(exchange, routing_key, body, message_id, f"cast to {service}.{action}", mandatory=True,
                        timeout=timeout, outgoing=outgoing)
        return message_id

    def publish_event(self, name: str, payload: Any = None, *,
                      timeout: float | None = None) -> None:
        """Publish event ``name`` (e.g. ``order.created``); returns once the broker confirmed it."""
        timeout, headers = self._deadline(timeout, with_deadline=False)
        message_id = envelope.new_id()
        exchange = self.topology.event_exchange
        outgoing = (self._outgoing("event", None, name, exchange, name, message_id, None, headers)
                    if self._observed else None)
        try:
            body = envelope.request_body(message_id=message_id, source=self.source, target=None, action=name,
                                         payload=_payload(payload), reply_to=None, headers=headers)
        except Exception as exc:  # a payload JSON cannot carry: what the hooks began for it ends too
            self._unsent(outgoing, exc)
            raise
        self._confirmed(exchange, name, body, message_id, f"event {name}", mandatory=False, timeout=timeout,
                        outgoing=outgoing)

    def submit(self, service: str, action: str, payload: Any = None, *,
               timeout: float | None = None, correlation_id: str | None = None,
               idempotency_key: str | None = None) -> str:
        """Accept-then-poll: send a request whose reply goes to the shared collector queue
        (``topology.collector_queue``) and return its correlation id.

        Returns once the broker confirmed it stored the request (a web tier that answered
        202 must not lose it; the confirm is one local round trip). Raises
        ServiceUnavailable at once if no queue is bound for ``service``, CallTimeout if the
        broker did not confirm within ``timeout`` seconds. The request carries no deadline:
        it runs whenever a worker gets to it. ``amqprpc collector`` stores the reply in
        Redis; read it with :class:`amqprpc.ResponseStore`. The id returned is also the
        request's message id (for :meth:`revoke`). ``idempotency_key`` as for :meth:`call`.

        ``correlation_id``: an id of the caller's own instead of a new one (at most 255
        ASCII characters), for a caller that must know it before sending (to mark the
        request pending first) or hand out an unguessable one (``secrets.token_hex(16)``:
        the ids amqprpc makes are unique, not secret).
        """
        timeout, headers = self._deadline(timeout, with_deadline=False, idempotency_key=idempotency_key)
        if correlation_id is not None:
            problem = (envelope.shortstr_problem("correlation_id", correlation_id) if correlation_id
                       else "correlation_id is empty")
            if problem:
                raise ValueError(problem)
        message_id = correlation_id or envelope.new_id()
        collector = self.topology.responses_queue()
        deadline = time.monotonic() + timeout
        if self._declared.get(collector.name) != self._loop.generation:
            # _confirmed publishes from this thread: let the loop thread declare first.
            declared = threading.Event()
            self._loop.call_soon(self._declare_once, collector)
            self._loop.call_soon(declared.set)
            if not declared.wait(timeout):
                raise CallTimeout(f"submit to {service}.{action}: the collector queue was not declared within "
                                  f"{timeout}s; nothing was sent")
        exchange, routing_key = self.topology.service_exchange, self.topology.request_key(service)
        outgoing = self._outgoing("submit", service, action, exchange, routing_key, message_id, message_id,
                                  headers) if self._observed else None
        try:
            body = envelope.request_body(message_id=message_id, source=self.source, target=service, action=action,
                                         payload=_payload(payload), reply_to=collector.name, headers=headers)
        except Exception as exc:  # a payload JSON cannot carry: what the hooks began for it ends too
            self._unsent(outgoing, exc)
            raise
        self._confirmed(exchange, routing_key, body, message_id, f"submit to {service}.{action}", mandatory=True,
                        timeout=deadline - time.monotonic(), outgoing=outgoing, correlation_id=message_id,
                        reply_to=collector.name)
        return message_id

    def revoke(self, service: str, message_id: str, *more_ids: str, ttl: float | None = None) -> None:
        """Revoke messages of ``service`` by message id (what :meth:`cast` and :meth:`submit`
        return, a call_async Future's ``message_id``), for every worker of the service:
        one not started yet is acked unrun (a call is answered with
        :class:`~amqprpc.errors.Revoked`), also after a countdown or retry delay; a running
        handler sees ``current_call().cancelled`` turn true within about a second. Kept in
        Redis (``redis_url``) for ``ttl`` seconds (default one day). Raises
        ServiceUnavailable if Redis cannot be reached (nothing was revoked)."""
        from amqprpc.middleware.revoke import DEFAULT_REVOKE_TTL, RevocationStore

        if self._revocations is None:
            self._revocations = RevocationStore(self.redis_url)
        self._revocations.revoke(service, (message_id, *more_ids), DEFAULT_REVOKE_TTL if ttl is None else ttl)

    def run(self, workflow: Any) -> Any:
        """Start ``workflow`` (:func:`amqprpc.chain`, ``group``, ``chord``, ``task``): its
        first steps cast (confirmed), its state in Redis (``AMQPRPC_REDIS_URL``); returns at
        once a :class:`~amqprpc.workflow.WorkflowHandle` (``.id``, ``.status()``,
        ``.result(timeout=S)``)."""
        from amqprpc.workflow import start

        return start(self, workflow)

    def revoke_workflow(self, workflow_id: str) -> bool:
        """Stop a workflow: its steps not yet started are acked unrun; its result raises
        :class:`~amqprpc.errors.WorkflowFailed`. False when it had ended already."""
        from amqprpc.workflow import WorkflowHandle, default_state

        return WorkflowHandle(workflow_id, default_state()).revoke()

    def proxy(self, service: str, *, timeout: float | None = None) -> "ServiceProxy":
        """An object whose attributes are the service's actions: ``proxy.get_user(user_id=...)``."""
        return ServiceProxy(self, service, timeout)

    def close(self) -> None:
        """Fail what is still pending, close the connection, end the loop thread."""
        if self._closed:
            return
        self._closed = True
        self._loop.stop()
        self._timer.close()
        if self._callbacks is not None:
            self._callbacks.shutdown(wait=False)

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- caller thread helpers -------------------------------------------------------
    def _deadline(self, timeout: float | None, with_deadline: bool = True,
                  idempotency_key: str | None = None) -> tuple[float, dict[str, Any]]:
        """The effective timeout (bounded by an enclosing handler's deadline) and the
        headers that carry the deadline, the trace id and the idempotency key onwards."""
        timeout = self.timeout if timeout is None else timeout
        current = context.current.get()
        headers: dict[str, Any] = {}
        now = time.time()
        deadline = now + timeout
        if current is not None:
            headers["trace_id"] = current.trace_id
            headers["parent_id"] = current.correlation_id
            if current.deadline is not None and current.deadline < deadline:
                deadline = current.deadline
                timeout = deadline - now
        else:
            headers["trace_id"] = envelope.new_id()
        if with_deadline:
            # Both: the absolute deadline for peers that read only that (the seed's PHP
            # services), the time left for a reader that counts it from arrival on its own
            # clock (envelope.Request.deadline), so that skewed clocks drop no calls.
            headers["deadline"] = round(deadline, 6)
            headers[envelope.TIMEOUT_MS_HEADER] = max(0, int(timeout * 1000))
        if idempotency_key is not None:
            headers["idempotency_key"] = str(idempotency_key)
        extra = context.outgoing_headers.get()
        if extra:
            headers.update(extra)
        return timeout, headers

    @property
    def _observed(self) -> bool:
        """Whether any middleware hooks what this client sends."""
        return bool(self.hooks.before_publish or self.hooks.after_settle)

    def _outgoing(self, kind: str, service: str | None, action: str, exchange: str, routing_key: str,
                  message_id: str, correlation_id: str | None, body_headers: dict[str, Any]) -> Outgoing:
        """What the middleware sees of a message about to be sent, before its body is built
        (``before_publish`` may set the envelope's trace_id); the headers the hooks set
        become its application_headers."""
        outgoing = Outgoing(kind, service, action, exchange, routing_key, message_id, correlation_id, body_headers)
        hooks = self.hooks
        if hooks.before_publish:
            hooks.run(hooks.before_publish, outgoing)
        return outgoing

    def _unsent(self, outgoing: Outgoing | None, exc: BaseException) -> None:
        """A message whose envelope could not be built: settled as an error for the hooks
        that saw it (before the caller gets the exception)."""
        if outgoing is not None and self.hooks.after_settle:
            self._settled(outgoing, exc)

    def _refused(self, service: str, action: str, exc: CircuitOpen) -> None:
        """A call the circuit breaker refused: nothing was built or published (no
        ``before_publish``), but it settles for ``after_settle`` as ``circuit_open``."""
        outgoing = Outgoing("call", service, action, self.topology.service_exchange,
                            self.topology.request_key(service), "", None, {})
        self._settled(outgoing, exc)

    def _settled(self, outgoing: Outgoing, exc: BaseException | None) -> None:
        hooks = self.hooks
        hooks.run(hooks.after_settle, outgoing, _call_outcome(exc, time.monotonic() - outgoing.started))

    def _confirmed(self, exchange: str, routing_key: str, body: bytes, message_id: str, what: str, *,
                   mandatory: bool, timeout: float, outgoing: Outgoing | None, **properties: Any) -> None:
        message = amqp.Message(body, content_type=envelope.CONTENT_TYPE, message_id=message_id, delivery_mode=2,
                               **properties)
        if outgoing is not None and outgoing.headers:
            message.properties["application_headers"] = outgoing.headers

        def attempt(left: float) -> None:
            future: Future[Any] = Future()
            self._send_confirmed(exchange, routing_key, message, message_id, what, mandatory, future)
            try:
                future.result(left)
            except FutureTimeout:
                raise CallTimeout(f"{what}: the broker did not confirm within {timeout}s") from None

        # Through a connection loss or a refusal: wait for the reconnect (or the replaced
        # channel) and send again, bounded (never kombu's retry-forever default). The same
        # message id goes each time.
        try:
            call_with_retry(attempt, PUBLISH_RETRY, timeout, retryable=(ConnectionLost, PublishRefused), share=False)
        except Exception as exc:
            if outgoing is not None and self.hooks.after_settle:
                self._settled(outgoing, exc)
            raise
        if outgoing is not None and self.hooks.after_settle:
            self._settled(outgoing, None)

    def _run_callback(self, callback: Callable[[Future[Any]], Any]) -> Callable[[Future[Any]], None]:
        if self._callbacks is None:
            self._callbacks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="amqprpc-callback")
        executor = self._callbacks

        def run(future: Future[Any]) -> None:
            executor.submit(callback, future)

        return run

    # --- loop thread -------------------------------------------------------------------
    def _on_connected(self, connection: Any) -> None:
        replies = connection.channel()
        self.topology.request_exchange()(replies).declare()
        self.topology.events_exchange()(replies).declare()
        self._loop.consume(replies, self.reply_queue, self._on_reply, no_ack=True)
        self._open_call_channel()
        self._open_confirm_channel()

    def _open_call_channel(self) -> None:
        """Requests go out confirmed: a request the broker refuses (nack) fails its call at
        once instead of at its timeout, and tells that the channel needs replacing. The
        broker's acks cost the loop thread one small frame per call, no caller waits on them."""
        channel = open_confirm_channel(self._loop.connection, self._on_call_ack, self._on_call_nack,
                                       self._on_call_returned)
        with self._write_lock:
            old, self._call_channel = self._call_channel, channel
            self._call_tags, self._call_seq, self._call_opened = {}, 0, time.monotonic()
        close_quietly(old)

    def _open_confirm_channel(self) -> None:
        """Casts, events and submits; confirms the old channel still owed fail as a lost
        connection would, so the bounded publish retry sends them again."""
        channel = open_confirm_channel(self._loop.connection, self._on_ack, self._on_nack, self._on_confirm_returned)
        with self._write_lock:
            old, self._confirm_channel = self._confirm_channel, channel
            confirms, self._confirms = self._confirms, {}
            self._publish_seq, self._confirm_opened = 0, time.monotonic()
        close_quietly(old)
        for future, _, what in confirms.values():
            _settle(future, exception=ConnectionLost(f"{what}: channel replaced before the broker confirmed"))

    def _replace_channel(self, which: str) -> None:
        """After nacks (on the loop thread, never inside the nack's own dispatch)."""
        if self._loop.connection is None or not self._loop.connected.is_set():
            return
        opened = self._call_opened if which == "call" else self._confirm_opened
        if not channel_refused(opened):
            return  # already replaced since this was asked for
        log.warning("publishing channel replaced: the broker kept refusing its publishes", channel=which)
        self.channels_replaced[which] += 1
        (self._open_call_channel if which == "call" else self._open_confirm_channel)()

    def _on_disconnected(self, exc: BaseException | None) -> None:
        with self._write_lock:  # no caller may publish on the dead channels after this
            self._call_channel = self._confirm_channel = None
            self._call_tags = {}
            confirms, self._confirms = self._confirms, {}
        with self._calls_lock:  # a call registered from now on finds no channel, or the next one
            pending, self._pending = self._pending, {}
            self._deadlines.clear()
        reason = "client closed" if exc is None else f"connection to the broker lost: {redact(describe(exc))}"
        for future, service, action, _ in pending.values():
            _settle(future, exception=ConnectionLost(f"{service}.{action}: {reason}"))
        for future, _, what in confirms.values():
            _settle(future, exception=ConnectionLost(f"{what}: {reason}; not confirmed"))
        self._unroutable.clear()

    def _declare_once(self, queue: Any) -> None:
        # Declared by the sender too, so that replies wait in the queue even before the
        # first collector ever ran (a reply to a missing queue is dropped by the broker).
        if self._confirm_channel is not None and self._declared.get(queue.name) != self._loop.generation:
            queue(self._confirm_channel).declare()
            self._declared[queue.name] = self._loop.generation

    def _register(self, message_id: str, future: Future[Any], service: str, action: str, timeout: float) -> None:
        """Pending from now on, with its deadline on the timer thread (:mod:`amqprpc.transport.deadlines`):
        it holds even if the loop thread publishes the call late, or never (a reconnect)."""
        due = time.monotonic() + timeout
        with self._calls_lock:
            pending, deadlines = self._pending, self._deadlines
            pending[message_id] = (future, service, action, timeout)
            if len(deadlines) > 2 * len(pending) + 1024:
                # Answered calls leave their deadline in the heap until it passes; drop
                # them now and then so the heap stays bounded by what is in flight.
                deadlines[:] = [entry for entry in deadlines if entry[1] in pending]
                heapq.heapify(deadlines)
            heapq.heappush(deadlines, (due, message_id))
            earliest = deadlines[0][1] == message_id
        if earliest:
            self._timer.arm(due)

    def _send_call(self, message_id: str, message: amqp.Message, service: str, action: str,
                   future: Future[Any]) -> None:
        """Publish from the caller's thread (any thread): no hop to the loop thread and
        back. But never wait for the lock: when another thread is writing, the loop thread
        publishes this call (in one go with whatever else piled up) rather than callers
        queueing on the lock, each sleep and wake-up a context switch."""
        if self._write_lock.acquire(blocking=False):
            try:
                self._publish_call(message_id, message, service, action, future)
            finally:
                self._write_lock.release()
        else:
            self._loop.call_soon(self._publish_call, message_id, message, service, action, future)

    def _publish_call(self, message_id: str, message: amqp.Message, service: str, action: str,
                      future: Future[Any]) -> None:
        """Under ``write_lock`` the channel cannot be swapped by a reconnect between the
        check and the publish."""
        if future.done():  # timed out, or failed with its connection, before its turn came
            return
        routing_key = self.topology.request_key(service)
        with self._write_lock:
            channel = self._call_channel
            if channel is None:
                self._pending.pop(message_id, None)
                _settle(future, exception=ConnectionLost(f"{service}.{action}: not connected to the broker"))
                return
            self._call_seq += 1
            self._call_tags[self._call_seq] = message_id
            try:
                publish(channel, message, self.topology.service_exchange, routing_key, mandatory=True)
            except Exception as exc:  # noqa: BLE001 - a broken connection; the loop reconnects
                self._pending.pop(message_id, None)
                self._call_tags.pop(self._call_seq, None)
                if isinstance(exc, UNENCODABLE):
                    self._call_seq -= 1  # nothing was sent: the broker's confirm numbers stay ours
                _settle(future, exception=_publish_error(f"{service}.{action}", exc))

    def _expire(self, now: float) -> float | None:
        """Fail every call whose deadline passed (on the timer thread); the next deadline.

        Deadlines of calls already answered are dropped too, due or not: the timer then
        sleeps until the oldest call still pending is due, instead of waking for every
        answered call's deadline (a thousand wake-ups a second under load)."""
        expired = []
        with self._calls_lock:  # callers push onto the heap from their own threads
            deadlines, pending = self._deadlines, self._pending
            while deadlines and (deadlines[0][0] <= now or deadlines[0][1] not in pending):
                _, message_id = heapq.heappop(deadlines)
                entry = pending.pop(message_id, None)
                if entry is not None:
                    expired.append(entry)
            next_due = deadlines[0][0] if deadlines else None
        for future, service, action, timeout in expired:
            _settle(future, exception=CallTimeout(f"{service}.{action}: no answer within {timeout:g}s"))
        return next_due

    def _on_reply(self, message: amqp.Message) -> None:
        doc = envelope.decode_reply(message.body)
        pending = self._pending
        entry = pending.pop(message.properties.get("correlation_id"), None)  # the common case, at once
        if entry is None:
            for call_id in envelope.reply_ids(message.properties, doc):
                entry = pending.pop(call_id, None)
                if entry is not None:
                    break
        if isinstance(message, UndecodableMessage):
            self._undecodable_reply(message, entry)
            return
        if entry is None:
            log.debug("reply for no pending call (late or duplicate)",
                      correlation_id=message.properties.get("correlation_id"))
            return
        future, service, action, _ = entry
        if not isinstance(doc, dict):
            _settle(future, exception=RemoteError("reply is not a JSON object", "BadReply"))
        elif doc.get("success"):
            _settle(future, result=doc.get("data"))
        elif doc.get("error_type") == "CallTimeout":
            # The deadline ran out further down the chain (nested calls share it): to this
            # caller that is its own timeout, whichever hop noticed first.
            _settle(future, exception=CallTimeout(f"{service}.{action}: {doc.get('error')}"))
        else:
            _settle(future, exception=envelope.remote_error(doc))

    def _undecodable_reply(self, message: UndecodableMessage, entry: tuple[Any, ...] | None) -> None:
        """A reply whose properties did not decode (a hostile or broken peer): the call it
        names (by what did decode, or its body's message_id) fails with BadReply; otherwise
        it is dropped (the reply queue is no_ack). Either way the connection stays up."""
        log.warning("undecodable reply", problem=message.problem, matched=entry is not None)
        if entry is not None:
            future, service, action, _ = entry
            _settle(future, exception=RemoteError(f"{service}.{action}: the reply could not be decoded: "
                                                  f"{message.problem}", "BadReply"))

    def _on_call_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            _take_tags(self._call_tags, delivery_tag)
        else:
            self._call_tags.pop(delivery_tag, None)

    def _on_call_nack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            ids = _take_tags(self._call_tags, delivery_tag)
        else:
            one = self._call_tags.pop(delivery_tag, None)
            ids = [] if one is None else [one]
        for message_id in ids:
            entry = self._pending.pop(message_id, None)
            if entry is not None:
                future, service, action, _ = entry
                _settle(future, exception=PublishRefused(f"{service}.{action}: the broker refused the request (nack)"))
        if channel_refused(self._call_opened):
            self._loop.call_soon(self._replace_channel, "call")

    def _on_call_returned(self, exc: Exception, exchange: str, routing_key: str, message: amqp.Message) -> None:
        entry = self._pending.pop(message.properties.get("correlation_id"), None)
        if entry is not None:
            future, service, action, _ = entry
            _settle(future, exception=ServiceUnavailable(
                f"{service}.{action}: no queue is bound for {routing_key!r} (is {service} deployed?)"))

    def _send_confirmed(self, exchange: str, routing_key: str, message: amqp.Message, message_id: str, what: str,
                        mandatory: bool, future: Future[Any]) -> None:
        """From the caller's thread, like _send_call: the confirm's delivery tag is the
        channel's publish count, so numbering and publishing happen under write_lock."""
        with self._write_lock:
            channel = self._confirm_channel
            if channel is None:
                _settle(future, exception=ConnectionLost(f"{what}: not connected to the broker"))
                return
            self._publish_seq += 1
            self._confirms[self._publish_seq] = (future, message_id, what)
            try:
                publish(channel, message, exchange, routing_key, mandatory=mandatory)
            except Exception as exc:  # noqa: BLE001 - a broken connection; the loop reconnects
                self._confirms.pop(self._publish_seq, None)
                if isinstance(exc, UNENCODABLE):
                    self._publish_seq -= 1  # nothing was sent: the broker's confirm numbers stay ours
                _settle(future, exception=_publish_error(what, exc))

    def _on_confirm_returned(self, exc: Exception, exchange: str, routing_key: str, message: amqp.Message) -> None:
        # basic.return precedes the basic.ack of the same message.
        self._unroutable.add(message.properties.get("message_id"))

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        for future, message_id, what in self._take_confirms(delivery_tag, multiple):
            if message_id in self._unroutable:
                self._unroutable.discard(message_id)
                _settle(future, exception=ServiceUnavailable(f"{what}: no queue is bound for it"))
            else:
                _settle(future, result=None)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        for future, _, what in self._take_confirms(delivery_tag, multiple):
            _settle(future, exception=PublishRefused(f"{what}: the broker refused the message (nack)"))
        if channel_refused(self._confirm_opened):
            self._loop.call_soon(self._replace_channel, "confirm")

    def _take_confirms(self, delivery_tag: int, multiple: bool) -> list[Any]:
        if not multiple:
            entry = self._confirms.pop(delivery_tag, None)
            return [entry] if entry else []
        with self._write_lock:  # callers add entries from their threads
            tags = [tag for tag in self._confirms if tag <= delivery_tag]
            return [self._confirms.pop(tag) for tag in tags]


class ServiceProxy:
    """``client.proxy("user-service").get_user(user_id="u1")``; camelCase attribute
    names are sent as snake_case actions (``getUser`` -> ``get_user``). A method takes a
    payload (dict or model) and/or fields as keywords, and ``returns=`` as for ``call``
    (so ``returns`` is no payload field name here)."""

    def __init__(self, client: Caller, service: str, timeout: float | None = None) -> None:
        self._client = client
        self._service = service
        self._timeout = timeout

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        action = snake_case(name)

        def remote_method(payload: Any = None, *, returns: Any = None, **kwargs: Any) -> Any:
            if kwargs:
                payload = {**_payload(payload), **kwargs}
            return self._client.call(self._service, action, payload, timeout=self._timeout, returns=returns)

        remote_method.__name__ = action
        return remote_method


def _payload(payload: Any) -> Any:
    """What the envelope carries: a dict as it is; a pydantic model or dataclass dumped to
    JSON types (:func:`amqprpc.contracts.to_payload`, imported only then)."""
    if payload is None:
        return {}
    if type(payload) is dict:
        return payload
    from amqprpc.contracts import to_payload

    return to_payload(payload)


def _parse(returns: Any, data: Any, service: str, action: str) -> Any:
    from amqprpc.contracts import parse

    return parse(returns, data, f"{service}.{action}")


def _publish_error(what: str, exc: Exception) -> Exception:
    """A request py-amqp cannot encode (a routing key over 255 bytes: a service or event
    name that long) is the caller's error, raised as ValueError; anything else means the
    connection broke (:class:`ConnectionLost`, which casts and events retry)."""
    if isinstance(exc, UNENCODABLE):
        return ValueError(f"{what}: cannot be sent: {exc}")
    return ConnectionLost(f"{what}: publish failed: {exc!r}")


def _take_tags(tags: dict[int, str], up_to: int) -> list[str]:
    """Pop every entry of ``tags`` up to delivery tag ``up_to`` (a confirm with ``multiple``).
    Tags are inserted in increasing order, so the scan stops at the first later one; no lock:
    each dict operation is atomic, and callers only ever add larger tags."""
    taken = []
    for tag in list(tags):
        if tag > up_to:
            break
        message_id = tags.pop(tag, None)
        if message_id is not None:
            taken.append(message_id)
    return taken


def _failure_of(future: Future[Any]) -> BaseException | None:
    return CallTimeout("cancelled") if future.cancelled() else future.exception()


def _call_outcome(exc: BaseException | None, duration: float) -> CallOutcome:
    """How a call (or a confirmed publish) settled, from what its caller got."""
    if exc is None:
        return CallOutcome(OK, None, duration)
    if isinstance(exc, RemoteError):
        return CallOutcome(ERROR, exc.error_type, duration)
    if isinstance(exc, CallTimeout):
        kind = TIMEOUT
    elif isinstance(exc, CircuitOpen):
        kind = CIRCUIT_OPEN
    elif isinstance(exc, PublishRefused):
        kind = REFUSED
    elif isinstance(exc, ServiceUnavailable):
        kind = UNAVAILABLE
    else:
        kind = ERROR
    return CallOutcome(kind, type(exc).__name__, duration)


def _settle(future: Future[Any], *, result: Any = None, exception: BaseException | None = None) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
