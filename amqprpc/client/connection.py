"""The connection side of :class:`~amqprpc.client.rpc.RpcClient`: its loop thread, channels,
reply queue, pending calls and publisher confirms (private: use RpcClient)."""
from __future__ import annotations

import heapq
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from typing import Any, Callable, Sequence

import amqp

from amqprpc import logs
from amqprpc.wire import envelope
from amqprpc.client.breaker import CircuitBreaker
from amqprpc.client.publishing import PublishChain
from amqprpc.client.waiter import CallWaiter
from amqprpc.client.countdown import CountdownQueues
from amqprpc.config import broker_url as default_broker_url
from amqprpc.config import redact
from amqprpc.transport.deadlines import Timer
from amqprpc.errors import CallTimeout, CircuitOpen, ConnectionLost, PublishRefused, RemoteError, ServiceUnavailable
from amqprpc.transport.framehandler import UndecodableMessage
from amqprpc.client.confirms import ConfirmedChannel, closed_error, default_max_message_size
from amqprpc.transport.ioloop import AmqpLoop
from amqprpc.transport.link import describe
from amqprpc.transport.readtoken import ReadToken
from amqprpc.middleware import Hooks, Middleware, Outgoing
from amqprpc.middleware.observability import automatic
from amqprpc.outcome import CIRCUIT_OPEN, ERROR, OK, REFUSED, TIMEOUT, UNAVAILABLE, CallOutcome
from amqprpc.retry import PUBLISH_RETRY, call_with_retry
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology

log = logs.get_logger("amqprpc.client")


class ClientConnection:
    """What an RpcClient holds: one connection (its loop thread), a call channel and a
    confirm channel, the reply queue and the calls waiting on it. RpcClient adds the
    public API on top."""

    def __init__(self, source: str = "amqprpc-client", *, broker_url: str | None = None, timeout: float = 5.0,
                 topology: Topology = DEFAULT_TOPOLOGY, heartbeat: float = 30.0, connect_timeout: float = 5.0,
                 breaker: CircuitBreaker | None = None, middleware: Sequence[Middleware] | None = None,
                 reconnect_cap: float = 10.0, redis_url: str | None = None, max_message_size: int | None = None):
        self.hooks = Hooks(middleware, builtin=automatic(middleware or ()))
        self._loop = AmqpLoop(default_broker_url(broker_url), name=f"amqprpc-client-{source}", heartbeat=heartbeat,
                              connect_timeout=connect_timeout, reconnect_cap=reconnect_cap,
                              on_connected=self._on_connected, on_disconnected=self._on_disconnected,
                              on_channel_closed=self._on_channel_closed)
        self.url = self._loop.url
        # Blocking callers read their own replies while nothing else waits (readtoken).
        self._lender = self._loop.lender = ReadToken(self._loop, self._may_lend)
        # Callers publish under the loop's write lock themselves (see _send_call).
        self._write_lock = self._loop.write_lock
        self.source = source
        self.timeout = timeout
        self._breaker = breaker
        self._chain: PublishChain | None = None  # composed by the first call (RpcClient._publishing)
        self.topology = topology
        self.redis_url = redis_url
        self._revocations: Any = None  # RevocationStore, made by the first revoke()
        self.reply_queue = topology.reply_queue(source)
        # Publishes go on two confirm channels of their own (calls; casts, events and
        # submits), replies arrive on a third: a channel the broker keeps refusing is
        # replaced without touching the reply consumer (the reply queue is auto-delete).
        self._replies: amqp.Channel | None = None
        self._calls: ConfirmedChannel[str] | None = None  # waiting for confirms: correlation ids
        self._casts: ConfirmedChannel[tuple[Future[Any], str, str]] | None = None  # (future, message id, what)
        self.max_message_size = max_message_size  # None: the broker's default, set once connected
        self.channels_replaced = {"call": 0, "confirm": 0}  # after the broker kept refusing them
        self._pending: dict[str, tuple[Future[Any], str, str, float]] = {}  # correlation id -> call
        self._deadlines: list[tuple[float, str]] = []  # heap of (monotonic deadline, correlation id)
        self._calls_lock = threading.Lock()  # the two above, between callers, loop and timer
        self._timer = Timer(self._expire, name=f"amqprpc-deadlines-{source}")
        self._unroutable: set[str] = set()
        self._declared: dict[str, int] = {}  # queue name -> connection generation it was declared on
        self._countdowns = CountdownQueues()
        self._callbacks: ThreadPoolExecutor | None = None
        self._closed = False
        try:
            self._loop.start()
        except Exception as exc:  # noqa: BLE001 - any connect failure is "unavailable" to a caller
            raise ServiceUnavailable(f"cannot connect to broker {redact(self.url)}: {redact(str(exc))}") from None

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The client's circuit breaker (None: none); setting it re-composes the publish chain."""
        return self._breaker

    @breaker.setter
    def breaker(self, breaker: CircuitBreaker | None) -> None:
        self._breaker, self._chain = breaker, None

    def _refused(self, service: str, action: str, exc: CircuitOpen) -> None:
        """A call the circuit breaker refused: nothing was built or published (no
        ``before_publish``), but it settles for ``after_settle`` as ``circuit_open``."""
        outgoing = Outgoing("call", service, action, self.topology.service_exchange,
                            self.topology.request_key(service), "", None, {})
        self._settled(outgoing, exc)

    def _run_callback(self, callback: Callable[[Future[Any]], Any]) -> Callable[[Future[Any]], None]:
        """``callback`` as a done-callback that runs on the client's callback thread (never
        on the loop or timer thread that resolves the Future)."""
        if self._callbacks is None:
            self._callbacks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="amqprpc-callback")
        executor = self._callbacks

        def run(future: Future[Any]) -> None:
            executor.submit(callback, future)

        return run

    def _may_lend(self) -> bool:
        """(loop thread) Whether nothing but blocking callers waits for the broker: no call
        pending, no confirm owed to a cast."""
        casts = self._casts
        return not self._pending and (casts is None or not casts.entries)

    def _reader_wanted(self) -> None:
        """After sending what a blocking caller's reads may not cover (a call_async, a cast):
        while the socket is lent, the loop thread takes it back (readtoken)."""
        if self._lender.lent:
            self._loop.call_soon(_ignore, ())

    def _settled(self, outgoing: Outgoing, exc: BaseException | None) -> None:
        hooks = self.hooks
        hooks.run(hooks.after_settle, outgoing, _call_outcome(exc, time.monotonic() - outgoing.started))

    def _confirmed(self, exchange: str, routing_key: str, body: bytes, message_id: str, what: str, *,
                   mandatory: bool, timeout: float, outgoing: Outgoing | None, **properties: Any) -> None:
        message = amqp.Message(body, content_type=envelope.CONTENT_TYPE, message_id=message_id, delivery_mode=2,
                               **properties)
        if outgoing is not None and outgoing.headers:
            message.properties["application_headers"] = {**(properties.get("application_headers") or {}),
                                                         **outgoing.headers}

        def attempt(left: float) -> None:
            future: Future[Any] = CallWaiter()  # only this thread waits on it (see waiter.py)
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

    # --- loop thread -------------------------------------------------------------------
    def _on_connected(self, connection: Any) -> None:
        replies = connection.channel()
        self.topology.request_exchange()(replies).declare()
        self.topology.events_exchange()(replies).declare()
        self._loop.consume(replies, self.reply_queue, self._on_reply, no_ack=True)
        self._replies = replies
        if self.max_message_size is None:
            self.max_message_size = default_max_message_size(connection.connection.server_properties)
        self._open_call_channel()
        self._open_confirm_channel()

    def _open_call_channel(self, error_of: Callable[[str], Exception] | None = None) -> None:
        """Requests go out confirmed: a request the broker refuses (nack) fails its call at
        once instead of at its timeout, and tells that the channel needs replacing. The
        broker's acks cost the loop thread one small frame per call, no caller waits on them.
        Calls the channel being replaced never confirmed fail at once with
        ``error_of("service.action")`` (by default: refused with the channel)."""
        calls = ConfirmedChannel(self._loop.connection, _ignore, self._on_call_nack, self._on_call_returned,
                                 self._max_body())
        with self._write_lock:
            old, self._calls = self._calls, calls
        if old is not None:
            self._fail_calls(old.close(), error_of or (lambda what: PublishRefused(
                f"{what}: the broker refused publishes on its channel, which was replaced before it confirmed "
                "this one")))

    def _open_confirm_channel(self, error_of: Callable[[str], Exception] | None = None) -> None:
        """Casts, events and submits; confirms the old channel still owed fail as a lost
        connection would (by default), so the bounded publish retry sends them again."""
        casts: ConfirmedChannel[tuple[Future[Any], str, str]] = ConfirmedChannel(
            self._loop.connection, self._on_ack, self._on_nack, self._on_confirm_returned, self._max_body())
        with self._write_lock:
            old, self._casts = self._casts, casts
        if old is not None:
            for future, _, what in old.close():
                _settle(future, exception=error_of(what) if error_of is not None else ConnectionLost(
                    f"{what}: channel replaced before the broker confirmed"))

    def _max_body(self) -> int:
        assert self.max_message_size is not None  # set from the broker's version on connect
        return self.max_message_size

    def _fail_calls(self, message_ids: list[str], error_of: Callable[[str], Exception]) -> None:
        with self._calls_lock:
            entries = [self._pending.pop(message_id, None) for message_id in message_ids]
        for entry in entries:
            if entry is not None:
                future, service, action, _ = entry
                _settle(future, exception=error_of(f"{service}.{action}"))

    def _replace_channel(self, which: str) -> None:
        """After nacks (on the loop thread, never inside the nack's own dispatch)."""
        if self._loop.connection is None or not self._loop.connected.is_set():
            return
        current = self._calls if which == "call" else self._casts
        if current is None or not current.refused_long_enough:
            return  # already replaced since this was asked for
        log.warning("publishing channel replaced: the broker kept refusing its publishes", channel=which)
        self.channels_replaced[which] += 1
        (self._open_call_channel if which == "call" else self._open_confirm_channel)()

    def _on_channel_closed(self, channel: amqp.Channel, error: BaseException) -> bool:
        """The broker closed one of our channels (loop thread): a publishing one is replaced
        and what it owed fails at once with the broker's reason (403 ACCESS_REFUSED:
        :class:`AccessRefused`); without the reply consumer nothing answers any call, so
        then the connection is started afresh (True)."""
        if channel is self._replies:
            return True
        error_of: Callable[[str], Exception] = lambda what: closed_error(what, error)  # noqa: E731
        if self._calls is not None and channel is self._calls.channel:
            self.channels_replaced["call"] += 1
            self._open_call_channel(error_of)
        elif self._casts is not None and channel is self._casts.channel:
            self.channels_replaced["confirm"] += 1
            self._open_confirm_channel(error_of)
        return False

    def _on_disconnected(self, exc: BaseException | None) -> None:
        with self._write_lock:  # no caller may publish on the dead channels after this
            casts, self._calls, self._casts, self._replies = self._casts, None, None, None
        with self._calls_lock:  # a call registered from now on finds no channel, or the next one
            pending, self._pending = self._pending, {}
            self._deadlines.clear()
        reason = "client closed" if exc is None else f"connection to the broker lost: {redact(describe(exc))}"
        for future, service, action, _ in pending.values():
            _settle(future, exception=ConnectionLost(f"{service}.{action}: {reason}"))
        for future, _, what in casts.unconfirmed() if casts is not None else ():
            _settle(future, exception=ConnectionLost(f"{what}: {reason}; not confirmed"))
        self._unroutable.clear()

    def _declare_once(self, queue: Any) -> None:
        # Declared by the sender too, so that replies wait in the queue even before the
        # first collector ever ran (a reply to a missing queue is dropped by the broker).
        if self._casts is not None and self._declared.get(queue.name) != self._loop.generation:
            queue(self._casts.channel).declare()
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
            calls = self._calls
            if calls is None:
                self._pending.pop(message_id, None)
                _settle(future, exception=ConnectionLost(f"{service}.{action}: not connected to the broker"))
                return
            try:
                calls.publish(message_id, message, self.topology.service_exchange, routing_key, True,
                              f"{service}.{action}")
            except Exception as exc:  # noqa: BLE001 - what the caller gets (ConfirmedChannel.publish)
                self._pending.pop(message_id, None)
                _settle(future, exception=exc)

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

    def _on_call_nack(self, calls: ConfirmedChannel[str], message_ids: list[str]) -> None:
        self._fail_calls(message_ids, lambda what: PublishRefused(f"{what}: the broker refused the request (nack)"))
        if calls is self._calls and calls.refused_long_enough:
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
            casts = self._casts
            if casts is None:
                _settle(future, exception=ConnectionLost(f"{what}: not connected to the broker"))
                return
            try:
                casts.publish((future, message_id, what), message, exchange, routing_key, mandatory, what)
            except Exception as exc:  # noqa: BLE001 - what the caller gets (ConfirmedChannel.publish)
                _settle(future, exception=exc)
        self._reader_wanted()

    def _on_confirm_returned(self, exc: Exception, exchange: str, routing_key: str, message: amqp.Message) -> None:
        # basic.return precedes the basic.ack of the same message.
        self._unroutable.add(message.properties.get("message_id"))

    def _on_ack(self, confirmed: list[tuple[Future[Any], str, str]]) -> None:
        for future, message_id, what in confirmed:
            if message_id in self._unroutable:
                self._unroutable.discard(message_id)
                _settle(future, exception=ServiceUnavailable(f"{what}: no queue is bound for it"))
            else:
                _settle(future, result=None)

    def _on_nack(self, casts: ConfirmedChannel[tuple[Future[Any], str, str]],
                 refused: list[tuple[Future[Any], str, str]]) -> None:
        for future, _, what in refused:
            _settle(future, exception=PublishRefused(f"{what}: the broker refused the message (nack)"))
        if casts is self._casts and casts.refused_long_enough:
            self._loop.call_soon(self._replace_channel, "confirm")


def _ignore(entries: list[str]) -> None:
    """A call's confirm: nothing to do (its reply settles it); a nack fails it."""


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
