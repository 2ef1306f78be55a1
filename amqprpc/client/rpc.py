"""RpcClient: thread-safe calls, casts and events over one connection.

Any number of threads may call at once. The caller's thread builds, serializes and publishes
the request (the loop thread, :class:`~amqprpc.transport.ioloop.AmqpLoop`, publishes it when
another thread is writing). Replies arrive on the client's one long-lived reply queue. The
loop thread reads them and settles the caller's Future. But while only blocking callers wait
for the broker, it lends them the socket: a blocking :meth:`RpcClient.call` then reads its own
reply, and any other caller's that arrives meanwhile
(:mod:`~amqprpc.transport.readtoken`). ``call_async``, casts, events and submits are read by
the loop thread, as before.
Deadlines fire on a timer thread of the client's own (:mod:`amqprpc.transport.deadlines`) and
writes never block (:mod:`amqprpc.transport.framewriter`), so no caller waits without a bound,
whatever the network or the loop thread does.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from datetime import datetime
from typing import Any, Callable, Mapping

import amqp

from amqprpc import context, logs
from amqprpc.wire import envelope
from amqprpc.client.countdown import ETA_HEADER, check_priority, delay_of
from amqprpc.errors import CallTimeout, ConnectionLost
from amqprpc.middleware import Outgoing, PublishCommand
from amqprpc.client.publishing import BreakerScope, PublishChain
from amqprpc.retry import Retry
from amqprpc.client.connection import ClientConnection, _failure_of, _settle
from amqprpc.client.proxy import ServiceProxy as ServiceProxy  # re-exported: its home was here
from amqprpc.client.proxy import outgoing_payload, parsed_data
from amqprpc.client.waiter import CallWaiter

log = logs.get_logger("amqprpc.client")

# How much longer than the call's own timeout a caller waits on its Future before it
# gives up on the timer thread (which fails every call at its deadline) and raises itself.
_GRACE = 0.25


class RpcClient(ClientConnection):
    """Calls services over RabbitMQ.

    Parameters: ``source`` names this caller in envelopes and in its reply queue;
    ``broker_url`` defaults to ``AMQPRPC_BROKER_URL``; ``timeout`` is the default call
    timeout in seconds; ``heartbeat``, ``connect_timeout`` and ``reconnect_cap`` (the
    longest wait between reconnect attempts) in seconds; ``middleware`` hooks around what it
    sends (:mod:`amqprpc.middleware`), after the process's defaults; ``redis_url`` where
    :meth:`revoke` stores revocations (default ``AMQPRPC_REDIS_URL``; used only by it);
    ``max_message_size`` the largest body it sends, in bytes (the broker's
    ``max_message_size``; by default RabbitMQ's default for the version it runs: 128 MiB
    before 4.0, 16 MiB since): a larger one raises :class:`~amqprpc.errors.MessageTooLarge`
    before anything is sent, as do headers that do not fit in one frame (``frame_max``).
    One lifecycle: connects at construction (raises :class:`ServiceUnavailable` if it
    cannot), :meth:`close` (or the ``with`` block) ends it. Its connection is an
    :class:`~amqprpc.transport.ioloop.AmqpLoop` it holds, not one it is.
    """

    # --- public API --------------------------------------------------------------------
    def call(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
             retry: Retry | None = None, returns: Any = None, idempotency_key: str | None = None,
             priority: int | None = None) -> Any:
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
        ``priority``: the message's priority (a service with ``max_priority`` takes its
        higher ones first; see docs/guides/tasks-in-time.md).
        """
        timeout = self.timeout if timeout is None else timeout
        chain = self._chain or self._publishing()
        if retry is None and chain.bare:
            data = self._call(service, action, payload, timeout, idempotency_key, priority)
        else:
            data = chain.run(PublishCommand("call", service, action, payload, timeout, retry, True,
                                            {"idempotency_key": idempotency_key, "priority": priority}))
        return data if returns is None else parsed_data(returns, data, service, action)

    def _call(self, service: str, action: str, payload: Any, timeout: float, idempotency_key: str | None = None,
              priority: int | None = None) -> Any:
        deadline = time.monotonic() + timeout
        future = self._call_async(service, action, payload, timeout, idempotency_key, priority, blocking=True)
        if not future.done():  # read the socket for the reply, if it is lent (transport.readtoken)
            self._lender.lead(future, deadline)
        try:
            return future.result(timeout + _GRACE)
        except FutureTimeout:
            raise CallTimeout(
                f"{service}.{action}: no answer within {timeout}s (its deadline timer was late)") from None

    def call_async(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
                   callback: Callable[[Future[Any]], Any] | None = None, returns: Any = None,
                   idempotency_key: str | None = None, priority: int | None = None) -> Future[Any]:
        """Send a call and return a Future of its ``data`` at once.

        ``callback(future)`` runs when it resolves, on a separate callback thread (so a
        callback may itself make calls). ``payload``, ``returns``, ``idempotency_key`` and
        ``priority`` as for :meth:`call` (the data is parsed on the callback thread, never on
        the I/O loop's). The Future's ``message_id`` attribute is the request's message id
        (for :meth:`revoke`; None when the circuit breaker refused and nothing was sent).
        """
        chain = self._chain or self._publishing()
        if chain.bare:
            future = self._call_async(service, action, payload, timeout, idempotency_key, priority)
        else:
            future = chain.run(PublishCommand("call", service, action, payload,
                                              self.timeout if timeout is None else timeout, None, False,
                                              {"idempotency_key": idempotency_key, "priority": priority}))
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
                _settle(parsed, result=parsed_data(returns, done.result(), service, action))
            except Exception as exc:  # noqa: BLE001 - ValidationError, or a type pydantic cannot build
                _settle(parsed, exception=exc)

        future.add_done_callback(self._run_callback(parse))
        return parsed

    def _call_async(self, service: str, action: str, payload: Any,
                    timeout: float | None, idempotency_key: str | None = None,
                    priority: int | None = None, blocking: bool = False) -> Future[Any]:
        """``blocking``: for :meth:`_call`, whose Future only its own thread waits on (a
        :class:`~amqprpc.client.waiter.CallWaiter`, lighter than a Future)."""
        check_priority(priority)
        timeout, headers = self._deadline(timeout, idempotency_key=idempotency_key)
        message_id = envelope.new_id()
        hooks = self.hooks
        outgoing = None
        if hooks.before_publish or hooks.after_settle:  # before the body is built: a hook may set its trace_id
            outgoing = self._outgoing("call", service, action, self.topology.service_exchange,
                                      self.topology.request_key(service), message_id, message_id, headers)
        if type(payload) is not dict:  # models, dataclasses, None: converted (a dict, the usual case, is not)
            payload = outgoing_payload(payload)
        try:
            body = envelope.request_body(message_id=message_id, source=self.source, target=service, action=action,
                                         payload=payload, reply_to=self.reply_queue.name, headers=headers)
        except Exception as exc:  # a payload JSON cannot carry: what the hooks began for it ends too
            self._unsent(outgoing, exc)
            raise
        message = amqp.Message(body, content_type=envelope.CONTENT_TYPE, message_id=message_id,
                               correlation_id=message_id, reply_to=self.reply_queue.name, delivery_mode=2,
                               expiration=str(max(1, int(timeout * 1000))))
        if priority is not None:
            message.properties["priority"] = priority
        future: Future[Any] = CallWaiter() if blocking else Future()
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
        if not blocking:
            self._reader_wanted()
        return future

    def cast(self, service: str, action: str, payload: Any = None, *, timeout: float | None = None,
             idempotency_key: str | None = None, countdown: float | None = None, eta: datetime | None = None,
             priority: int | None = None, message_id: str | None = None,
             headers: Mapping[str, Any] | None = None) -> str:
        """Send a request that gets no reply; return its message id (for :meth:`revoke`).
        Returns once the broker confirmed it stored the message; raises ServiceUnavailable if
        no queue takes it. ``idempotency_key`` as for :meth:`call`: a repeat is acked unrun.

        ``countdown`` seconds or ``eta`` (a timezone-aware datetime): it runs no earlier, at
        most 1 s late up to an hour, 0.5% beyond (up to 30 days); meanwhile it waits in the
        broker, durable (see :mod:`amqprpc.client.countdown`). ``priority``: see :meth:`call`.
        ``message_id``: one of the caller's own (the beat names each tick so); ``headers``:
        AMQP application headers to send with it."""
        options = {"idempotency_key": idempotency_key, "countdown": countdown, "eta": eta, "priority": priority,
                   "message_id": message_id, "headers": headers}
        return self._through_chain("cast", service, action, payload, timeout, options)  # type: ignore[no-any-return]

    def _cast(self, service: str, action: str, payload: Any, timeout: float | None, idempotency_key: str | None,
              countdown: float | None, eta: datetime | None, priority: int | None, message_id: str | None,
              headers: Mapping[str, Any] | None) -> str:
        timeout, body_headers = self._deadline(timeout, with_deadline=False, idempotency_key=idempotency_key)
        message_id = message_id or envelope.new_id()
        exchange, routing_key = self.topology.service_exchange, self.topology.request_key(service)
        check_priority(priority)
        wait = delay_of(countdown, eta)
        properties: dict[str, Any] = {} if priority is None else {"priority": priority}
        if headers:
            properties["application_headers"] = dict(headers)
        if wait is not None and wait > 0:
            exchange, routing_key, delayed = self._delayed(service, wait, timeout)
            properties["application_headers"] = {**(headers or {}), **delayed}
        outgoing = self._outgoing("cast", service, action, exchange, routing_key, message_id, None,
                                  body_headers) if self._observed else None
        try:
            body = envelope.request_body(message_id=message_id, source=self.source, target=service, action=action,
                                         payload=outgoing_payload(payload), reply_to=None, headers=body_headers)
        except Exception as exc:  # a payload JSON cannot carry: what the hooks began for it ends too
            self._unsent(outgoing, exc)
            raise
        self._confirmed(exchange, routing_key, body, message_id, f"cast to {service}.{action}", mandatory=True,
                        timeout=timeout, outgoing=outgoing, **properties)
        return message_id

    def _delayed(self, service: str, wait: float, timeout: float) -> tuple[str, str, dict[str, Any]]:
        """Exchange, routing key and headers of a cast that waits ``wait`` seconds in the
        broker: its countdown queue is declared first (on the loop thread)."""
        due = time.time() + wait
        target = self.topology.request_queue_format.format(service=service)
        queue = self.topology.countdown_queue(target, self.topology.countdown_ms(wait))
        generation = self._loop.generation
        if self._countdowns.due(queue.name, generation):
            declared: Future[None] = Future()

            def declare() -> None:
                try:
                    if self._loop.connection is None:
                        raise ConnectionLost(f"cast to {service}: not connected to the broker")
                    self._countdowns.declare(self._loop.connection, generation, queue, target)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    declared.set_exception(exc)
                else:
                    declared.set_result(None)

            self._loop.call_soon(declare)
            try:
                declared.result(timeout)
            except FutureTimeout:
                raise CallTimeout(f"cast to {service}: its countdown queue was not declared within {timeout}s; "
                                  "nothing was sent") from None
        return "", queue.name, {ETA_HEADER: round(due, 3)}

    def publish_event(self, name: str, payload: Any = None, *,
                      timeout: float | None = None) -> None:
        """Publish event ``name`` (e.g. ``order.created``); returns once the broker confirmed it."""
        self._through_chain("event", None, name, payload, timeout, {})

    def _publish_event(self, name: str, payload: Any, timeout: float | None) -> None:
        timeout, headers = self._deadline(timeout, with_deadline=False)
        message_id = envelope.new_id()
        exchange = self.topology.event_exchange
        outgoing = (self._outgoing("event", None, name, exchange, name, message_id, None, headers)
                    if self._observed else None)
        try:
            body = envelope.request_body(message_id=message_id, source=self.source, target=None, action=name,
                                         payload=outgoing_payload(payload), reply_to=None, headers=headers)
        except Exception as exc:  # a payload JSON cannot carry: what the hooks began for it ends too
            self._unsent(outgoing, exc)
            raise
        self._confirmed(exchange, name, body, message_id, f"event {name}", mandatory=False, timeout=timeout,
                        outgoing=outgoing)

    def submit(self, service: str, action: str, payload: Any = None, *,
               timeout: float | None = None, correlation_id: str | None = None,
               idempotency_key: str | None = None, countdown: float | None = None, eta: datetime | None = None,
               priority: int | None = None) -> str:
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
        ``countdown``, ``eta`` and ``priority`` as for :meth:`cast`.
        """
        options = {"correlation_id": correlation_id, "idempotency_key": idempotency_key, "countdown": countdown,
                   "eta": eta, "priority": priority}
        return self._through_chain("submit", service, action, payload, timeout, options)  # type: ignore[no-any-return]

    def _submit(self, service: str, action: str, payload: Any, timeout: float | None, correlation_id: str | None,
                idempotency_key: str | None, countdown: float | None, eta: datetime | None,
                priority: int | None) -> str:
        timeout, headers = self._deadline(timeout, with_deadline=False, idempotency_key=idempotency_key)
        if correlation_id is not None:
            problem = (envelope.shortstr_problem("correlation_id", correlation_id) if correlation_id
                       else "correlation_id is empty")
            if problem:
                raise ValueError(problem)
        message_id = correlation_id or envelope.new_id()
        collector = self.topology.responses_queue()
        deadline = time.monotonic() + timeout
        check_priority(priority)
        wait = delay_of(countdown, eta)
        properties: dict[str, Any] = {} if priority is None else {"priority": priority}
        if self._declared.get(collector.name) != self._loop.generation:
            # _confirmed publishes from this thread: let the loop thread declare first.
            declared = threading.Event()
            self._loop.call_soon(self._declare_once, collector)
            self._loop.call_soon(declared.set)
            if not declared.wait(timeout):
                raise CallTimeout(f"submit to {service}.{action}: the collector queue was not declared within "
                                  f"{timeout}s; nothing was sent")
        exchange, routing_key = self.topology.service_exchange, self.topology.request_key(service)
        if wait is not None and wait > 0:
            exchange, routing_key, properties["application_headers"] = self._delayed(
                service, wait, deadline - time.monotonic())
        outgoing = self._outgoing("submit", service, action, exchange, routing_key, message_id, message_id,
                                  headers) if self._observed else None
        try:
            body = envelope.request_body(message_id=message_id, source=self.source, target=service, action=action,
                                         payload=outgoing_payload(payload), reply_to=collector.name, headers=headers)
        except Exception as exc:  # a payload JSON cannot carry: what the hooks began for it ends too
            self._unsent(outgoing, exc)
            raise
        self._confirmed(exchange, routing_key, body, message_id, f"submit to {service}.{action}", mandatory=True,
                        timeout=deadline - time.monotonic(), outgoing=outgoing, correlation_id=message_id,
                        reply_to=collector.name, **properties)
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
    def _publishing(self) -> PublishChain:
        """The publish chain (:mod:`amqprpc.client.publishing`), composed on first use."""
        breaker = self.breaker
        scope = None if breaker is None else BreakerScope(
            breaker, self._refused if self.hooks.after_settle else None, self._run_callback)
        self._chain = chain = PublishChain(self._send_command, self.hooks.publish_scope, scope)
        return chain

    def _through_chain(self, kind: str, service: str | None, action: str, payload: Any, timeout: float | None,
                       options: dict[str, Any]) -> Any:
        """A cast, event or submit, through the chain (straight to its end when it is bare)."""
        command = PublishCommand(kind, service, action, payload, self.timeout if timeout is None else timeout,
                                 options=options)
        chain = self._chain or self._publishing()
        return self._send_command(command) if chain.bare else chain.run(command)

    def _send_command(self, command: PublishCommand) -> Any:
        """The chain's last stage: what the command asks for, built, sent and (a blocking
        call) waited for."""
        kind, service, options = command.kind, command.service or "", command.options
        if kind == "event":
            return self._publish_event(command.action, command.payload, command.timeout)
        send: Callable[..., Any]
        if kind == "call":
            send = self._call if command.blocking else self._call_async
        else:
            send = self._cast if kind == "cast" else self._submit
        return send(service, command.action, command.payload, command.timeout, **options)

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
