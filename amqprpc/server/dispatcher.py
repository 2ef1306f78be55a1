"""What happens to one message, decided without a connection: the :class:`Dispatcher`.

Given a delivery (an ``amqp.Message`` as received, or one that did not decode), it runs
everything that happens to it and returns one final :class:`Decision` -- a reply, a
forward into a delay or dead-letter queue, an ack or a discard -- with its
:class:`~amqprpc.outcome.Outcome`. The :class:`~amqprpc.server.worker.Worker` owns
threads, acks and the loop and carries the decision out; the in-memory test client
(:mod:`amqprpc.testing.inmemory`) runs the same dispatcher and carries it out in-process.

The pipeline, outermost first (each stage is a ``scope(call_next, delivery)``; the chain is
composed once, when the dispatcher is made)::

    screen          undecodable / redelivered too often / not a valid request  -> Decision
    before_handle   (simple hooks, once per delivery, whatever happens)
    expiry          a call whose deadline passed is dropped unrun
    routing         the handler (or built-in) for the action, or UnknownAction
    consume_scope   of each middleware, in list order (revoke, idempotency, rate limit...);
                    one with a ``consume_gate`` only for a delivery that carries its key
    run             the failure policy: the handler's result becomes a reply, its
                    exception a retry, an error reply or a dead letter
    handle_scope    of each middleware, right around the handler (time limit...)
    the handler
    after_handle    (simple hooks)

A stage that raises (a bug, a middleware's own failure) never kills the handler thread:
the message is dead-lettered as ``WorkerError``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import amqp

from amqprpc import context, logs
from amqprpc.errors import BadMessage, ReplyTooLarge, ValidationError
from amqprpc.middleware import Delivery, Hooks
from amqprpc.outcome import Outcome, OutcomeKind
from amqprpc.retry import ERROR, ERROR_TYPE, Retry, attempts_made
from amqprpc.server.events import EventConsumer
from amqprpc.service import Handler, Service
from amqprpc.transport.framehandler import UndecodableMessage
from amqprpc.transport.redelivery import UNDECODABLE, Forward, Redelivery
from amqprpc.wire import envelope
from amqprpc.wire.ids import snake_case

log = logs.get_logger("amqprpc.worker")

Scope = Callable[[Callable[[Delivery], "Decision"], Delivery], "Decision"]
HandleScope = Callable[[Callable[[Delivery], Any], Delivery], Any]


#: The outcome of a decision made after the outcome was accounted for (see Worker._amend).
UNSET = Outcome(OutcomeKind.FAILED)


class Decision:
    """The one verdict for a delivery: the reply to publish (``body`` to ``reply_to``, if
    any), then ``forward`` it (retry, delay, dead letter, recount: acked once the copy is
    confirmed), or ``discard`` it (reject, no requeue: the last resort when not even a dead
    letter can be built), or else ack it; and the ``outcome`` that is accounted for
    (amended when the reply or the copy cannot be encoded); ``delivery`` the middleware's
    view of it."""

    __slots__ = ("reply_to", "correlation_id", "body", "forward", "discard", "outcome", "delivery")

    def __init__(self, reply_to: Optional[str] = None, correlation_id: Optional[str] = None,
                 body: Optional[bytes] = None, forward: Optional[Forward] = None, *, discard: bool = False,
                 outcome: Outcome = UNSET, delivery: Optional[Delivery] = None) -> None:
        self.reply_to = reply_to
        self.correlation_id = correlation_id
        self.body = body
        self.forward = forward
        self.discard = discard
        self.outcome = outcome
        self.delivery = delivery

    def __repr__(self) -> str:
        return f"<Decision {self.outcome.kind.value} reply={self.body is not None} forward={self.forward is not None}>"


class Dispatcher:
    """Decides and runs what happens to the messages of one service (any handler thread).

    ``event_consumers`` by consumer tag (a delivery's ``consumer_tag`` says which event
    handler it is for); ``builtins`` actions answered besides the service's own (ping),
    looked up at each delivery (middleware registers them as the worker starts); ``hooks``
    the resolved middleware; ``owner`` what ``delivery.worker`` names (the worker).
    """

    def __init__(self, service: Service, *, queue_name: str, redelivery: Redelivery, hooks: Hooks,
                 event_consumers: Mapping[str, EventConsumer] | None = None,
                 builtins: Mapping[str, Handler] | None = None, max_message_bytes: int = 1 << 20,
                 max_reply_bytes: int = 16 << 20, owner: Any = None) -> None:
        self.service = service
        self.queue_name = queue_name
        self.redelivery = redelivery
        self.hooks = hooks
        self.event_consumers = event_consumers or {}
        self.builtins: Mapping[str, Handler] = builtins if builtins is not None else {}
        self.max_message_bytes = max_message_bytes
        self.max_reply_bytes = max_reply_bytes
        self.owner = owner
        # No handle_scope: _run calls the handler itself (a frame less per delivery).
        self._handle_chain = _compose(hooks.handle_scope, _invoke) if hooks.handle_scope else None
        inner: Callable[[Delivery], Decision] = functools.partial(_run, self._handle_chain)
        scopes, gates = hooks.consume_scope, hooks.consume_gates
        self._chain = _compose([self._admit, *scopes], inner)
        # Gated scopes (Eta, Idempotency, Workflows: their work needs a header) are left out
        # of a second chain, which a delivery with none of their keys takes; any key: all.
        gated = [gate for gate in gates if gate]
        self._lean: Callable[[Delivery], Decision] | None = _compose(
            [self._admit, *(scope for scope, gate in zip(scopes, gates) if not gate)], inner) if gated else None
        self._gate_headers = frozenset(key for gate in gated for field, key in gate if field == "headers")
        self._gate_body = frozenset(key for gate in gated for field, key in gate if field == "body_headers")

    # --- the one entry point ---------------------------------------------------------
    def dispatch(self, message: amqp.Message) -> Decision:
        """Everything that happens to ``message``; its decision, outcome decided."""
        started = time.perf_counter()
        consumer = self.event_consumers.get(message.delivery_info.get("consumer_tag")) if self.event_consumers else None
        queue_name = self.queue_name if consumer is None else consumer.queue.name
        properties = message.properties
        kind = "event" if consumer else "call" if properties.get("reply_to") else "cast"
        delivery = Delivery(self.service.name, kind, queue_name, properties, message.delivery_info,
                            len(message.body or b""), started)
        delivery.message = message
        delivery.worker = self.owner
        delivery.decide = self
        hooks = self.hooks
        try:
            decision = self._screen(delivery, consumer)
        except Exception as exc:  # noqa: BLE001 - a bug here must not kill the handler thread
            decision = self.crashed(delivery, exc)
        if hooks.before_handle:  # before_handle and after_handle: once each, whatever happens
            hooks.run(hooks.before_handle, delivery)
        if decision is None:
            if delivery.kind != "event":  # with the trace id before_handle may have set (OpenTelemetry)
                # The fields of the handler's own lines too (_run does not bind them again).
                logs.clear_request()
                correlation_id = delivery.correlation_id or ""
                logs.bind_request(service=delivery.service, action=delivery.action or "",
                                  correlation_id=correlation_id, trace_id=delivery.trace_id or correlation_id,
                                  parent_id=delivery.body_headers.get("parent_id"))
            chain = self._lean  # (most messages carry no AMQP headers: _EMPTY, falsy)
            if chain is None or not self._gate_body.isdisjoint(delivery.body_headers) or (
                    delivery.headers and not self._gate_headers.isdisjoint(delivery.headers)):
                chain = self._chain
            try:
                decision = chain(delivery)
            except Exception as exc:  # noqa: BLE001 - a bug or a failing scope must not kill the thread
                decision = self.crashed(delivery, exc)
        decision.delivery = delivery
        if hooks.after_handle:
            hooks.run(hooks.after_handle, delivery, decision.outcome)
        return decision

    # --- screening: what never reaches a handler -------------------------------------
    def _screen(self, delivery: Delivery, consumer: EventConsumer | None) -> Decision | None:
        """A Decision for what is not to run (undecodable, poison, not a valid request);
        None when it decoded (``delivery`` then describes it)."""
        message = delivery.message
        if isinstance(message, UndecodableMessage):
            return self._undecodable(delivery, message)
        poisoned = self.redelivery.poisoned(message, delivery.queue)
        if poisoned is not None:
            dead = poisoned.kind is OutcomeKind.DEAD_LETTERED
            if dead:
                log.error("message redelivered too often, dead-lettered unrun", queue=delivery.queue,
                          correlation_id=message.properties.get("correlation_id"))
            return Decision(forward=poisoned, outcome=_outcome(delivery, poisoned.kind,
                                                               "TooManyRedeliveries" if dead else None, dead))
        try:
            request = envelope.decode_request(message.body, message.properties, self.max_message_bytes)
        except BadMessage as exc:
            if consumer is not None:
                log.warning("bad event message", reason=exc.reason, handler=consumer.subscription.name)
                return self.dead_letter(delivery, exc.reason, "BadMessage", OutcomeKind.REFUSED)
            return self._refuse(delivery, exc.reason)
        _describe(delivery, request, consumer)
        return None

    def _refuse(self, delivery: Delivery, reason: str) -> Decision:
        """A message that is not a valid request: answer it if it names a reply queue,
        otherwise dead-letter it with the reason (never a requeue loop)."""
        message = delivery.message
        body = message.body
        if len(body) <= self.max_message_bytes:
            reply_to, correlation_id = envelope.reply_address(message.properties, body)
        else:
            reply_to, correlation_id = message.properties.get("reply_to"), message.properties.get("correlation_id")
        log.warning("bad message", reason=reason, correlation_id=correlation_id[:255] if correlation_id else None,
                    answered=bool(reply_to))
        if reply_to:
            # A correlation id too long for the property still goes back in the body, where
            # a client that matches replies by message_id finds it.
            sendable = None if correlation_id and envelope.shortstr_problem("", correlation_id) else correlation_id
            return Decision(reply_to, sendable, envelope.error_reply(reason, "BadMessage", correlation_id),
                            outcome=_outcome(delivery, OutcomeKind.REFUSED, "BadMessage"))
        return self.dead_letter(delivery, reason, "BadMessage", OutcomeKind.REFUSED)

    def _undecodable(self, delivery: Delivery, message: UndecodableMessage) -> Decision:
        """A delivery whose properties (or routing key) did not decode: dead-lettered unrun
        with its raw bytes. If its reply address did decode, the caller also gets an error
        reply, rather than wait for its timeout."""
        properties = message.properties
        reply_to, correlation_id = properties.get("reply_to"), properties.get("correlation_id")
        log.warning("undecodable message dead-lettered", problem=message.problem, queue=delivery.queue,
                    correlation_id=correlation_id, answered=bool(reply_to))
        forward = self.redelivery.undecodable(message, delivery.queue)
        outcome = _outcome(delivery, OutcomeKind.REFUSED, UNDECODABLE, True)
        if not (reply_to and correlation_id) or delivery.kind == "event":  # events get no replies
            return Decision(forward=forward, outcome=outcome)
        reason = f"Undecodable message: {message.problem}"
        return Decision(reply_to, correlation_id, envelope.error_reply(reason, "BadMessage", correlation_id), forward,
                        outcome=outcome)

    # --- the built-in stages -----------------------------------------------------------
    def _admit(self, call_next: Callable[[Delivery], Decision], delivery: Delivery) -> Decision:
        """Expiry, then routing, in one stage (a frame less per delivery). Expiry: see
        :meth:`_expired`. Routing: the function that runs the delivery and its retry policy;
        UnknownAction for an action nobody handles (an error reply, or a dead letter for a cast)."""
        deadline = delivery.deadline
        if not (deadline is None or time.time() <= deadline):  # (as written: a NaN deadline has passed)
            return self._expired(delivery, deadline)
        if delivery.kind == "event":
            return call_next(delivery)  # _describe set the subscription's function
        action = delivery.action or ""
        handler = self.service.find(action)
        builtin = handler is None
        if builtin:
            handler = self.builtins.get(action)
        if handler is None:
            if delivery.kind == "cast":  # nobody hears the error: say where the message went
                log.warning("unknown action, dead-lettered", action=action, correlation_id=delivery.correlation_id,
                            trace_id=delivery.trace_id, dead_letter_queue=self.redelivery.dead_queue.name)
                return self.dead_letter(delivery, f"Unknown action: {action}", "UnknownAction")
            log.warning("unknown action", action=action, correlation_id=delivery.correlation_id,
                        trace_id=delivery.trace_id)
            return self.error_reply(delivery, f"Unknown action: {action}", "UnknownAction")
        name = action if builtin or action in self.service.handlers else snake_case(action)
        delivery.function = handler
        delivery.handler = name
        # Service.retry_policy(action), by the registered name found above: without its
        # snake_case (a regex) on every delivery of an action that has no policy.
        delivery.retry = None if builtin else self.service.retries.get(name)
        return call_next(delivery)

    def _expired(self, delivery: Delivery, deadline: float) -> Decision:
        """A call or cast whose deadline passed is dropped unrun: its caller stopped
        waiting. A retry that came back too late is answered with its last error."""
        request = delivery.request
        assert request is not None
        log.info("request expired, dropped unrun", action=request.action, correlation_id=request.correlation_id,
                 trace_id=delivery.trace_id, late_by=round(time.time() - deadline, 3))
        headers = delivery.headers
        if attempts_made(headers) and request.reply_to:  # a retry came back too late: say why it failed
            error_type = str(headers.get(ERROR_TYPE))
            return Decision(request.reply_to, request.correlation_id, envelope.error_reply(
                str(headers.get(ERROR)), error_type, request.message_id),
                outcome=_outcome(delivery, OutcomeKind.EXPIRED, error_type))
        return Decision(outcome=_outcome(delivery, OutcomeKind.EXPIRED, None))

    # --- decisions middleware may make (delivery.decide) -------------------------------
    def reply(self, delivery: Delivery, result: Any) -> Decision:
        """The handler returned ``result``: the reply of a call (an error reply when the
        result cannot travel), an ack of a cast or event."""
        delivery.result = result
        if delivery.kind == "event":
            return Decision(outcome=_outcome(delivery, OutcomeKind.DONE, None))
        try:
            body = envelope.ok_reply(result, delivery.message_id)
        except (TypeError, ValueError) as exc:
            failure: Exception = TypeError(f"Result is not JSON serializable: {exc}")
        else:
            if len(body) <= self.max_reply_bytes:  # the usual case: one clock read, no helper calls
                duration = time.perf_counter() - delivery.started
                log.debug("request handled", duration=round(duration, 6))
                kind = OutcomeKind.REPLIED if delivery.reply_to else OutcomeKind.DONE
                return Decision(delivery.reply_to, delivery.correlation_id, body,
                                outcome=Outcome(kind, None, duration))
            failure = ReplyTooLarge(f"Result is {len(body)} bytes of JSON; replies are limited "
                                    f"to {self.max_reply_bytes}")
        return self._failed_reply(delivery, failure)

    def error(self, delivery: Delivery, exc: Exception) -> Decision:
        """The handler raised ``exc``: a retry through a delay queue while its policy (and
        the caller's deadline) allow; else an error reply to a call, or a dead letter for a
        cast or event (never a hot requeue loop, never dropped)."""
        duration = time.perf_counter() - delivery.started
        error_type = type(exc).__name__
        log.warning("event handler failed" if delivery.kind == "event" else "handler failed", error=str(exc),
                    error_type=error_type, duration=round(duration, 6))
        forward = self.redelivery.retry_later(delivery.message, delivery.queue, exc, delivery.retry,
                                              delivery.deadline, duration)
        if forward is not None:
            log.info("retry scheduled", attempt=forward.message.properties["application_headers"]["x-attempts"],
                     delay_queue=forward.routing_key)
            return Decision(forward=forward, outcome=_outcome(delivery, OutcomeKind.RETRIED, error_type))
        if delivery.kind == "call":
            return self._failed_reply(delivery, exc, logged=True)
        return self.dead_letter(delivery, str(exc) or error_type, error_type)

    def error_reply(self, delivery: Delivery, error: str, error_type: str,
                    kind: OutcomeKind = OutcomeKind.FAILED) -> Decision:
        """An error reply (``error_type``: the exception name the caller raises)."""
        return Decision(delivery.reply_to, delivery.correlation_id,
                        envelope.error_reply(error, error_type, delivery.message_id),
                        outcome=_outcome(delivery, kind, error_type))

    def ack(self, delivery: Delivery, kind: OutcomeKind, error_type: str | None = None) -> Decision:
        """Acked unrun (a duplicate, a revoked cast...), counted as ``kind``."""
        return Decision(outcome=_outcome(delivery, kind, error_type))

    def later(self, delivery: Delivery, delay: float, kind: OutcomeKind) -> Decision:
        """Back into its queue after about ``delay`` seconds, through the delay bucket that
        fits (nothing held unacked meanwhile; headers kept, attempts not counted)."""
        forward = self.redelivery.later(delivery.message, delivery.queue, delay, kind)
        return Decision(forward=forward, outcome=_outcome(delivery, kind, None))

    def dead_letter(self, delivery: Delivery, reason: str, error_type: str,
                    kind: OutcomeKind = OutcomeKind.DEAD_LETTERED) -> Decision:
        """To the service's dead-letter queue with ``reason``, counted as ``kind``."""
        forward = self.redelivery.dead_letter(delivery.message, delivery.queue, reason, error_type)
        return Decision(forward=forward, outcome=_outcome(delivery, kind, error_type, True))

    def crashed(self, delivery: Delivery, exc: Exception) -> Decision:
        """A message the worker itself failed on: dead-lettered (without its headers if
        they are what fails); rejected without requeue when even that fails (the broker
        dead-letters it from a quorum queue, drops it from a classic one)."""
        log.exception("worker failed to process a message")
        for keep_headers in (True, False):  # the headers from the wire may be what failed
            try:
                forward = self.redelivery.dead_letter(delivery.message, delivery.queue, repr(exc), "WorkerError",
                                                      keep_headers=keep_headers)
                return Decision(forward=forward,
                                outcome=_outcome(delivery, OutcomeKind.DEAD_LETTERED, "WorkerError", True))
            except Exception:  # noqa: BLE001 - never let one message end the handler thread
                log.exception("message cannot be dead-lettered", with_headers=keep_headers)
        return Decision(discard=True, outcome=_outcome(delivery, OutcomeKind.DEAD_LETTERED, "WorkerError"))

    def _failed_reply(self, delivery: Delivery, exc: Exception, logged: bool = False) -> Decision:
        error_type = type(exc).__name__
        if not logged:
            log.warning("handler failed", error=str(exc), error_type=error_type,
                        duration=round(time.perf_counter() - delivery.started, 6))
        # A ValidationError's failing fields travel too ("errors"), for callers in any language.
        body = envelope.error_reply(str(exc), error_type, delivery.message_id,
                                    exc.errors if isinstance(exc, ValidationError) else None)
        return Decision(delivery.reply_to, delivery.correlation_id, body,
                        outcome=_outcome(delivery, OutcomeKind.FAILED, error_type))


def _run(handle: Callable[[Delivery], Any] | None, delivery: Delivery) -> Decision:
    """The failure policy around the handler: inside the call context its nested calls and
    log lines inherit, its result becomes the decision, and so does its exception.
    ``handle`` the handle_scope chain, None when there is none (the handler is called
    directly). What :func:`bound` does, without a generator-based context manager: this
    runs for every delivery."""
    decide: Dispatcher = delivery.decide
    # A call's or cast's log fields are bound already (dispatch, before the chain); an
    # event's are bound here, with its handler's name.
    token = _bind(delivery, fields=delivery.kind == "event")
    try:
        try:
            result = delivery.function(delivery.payload) if handle is None else handle(delivery)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - every handler error becomes a decision
            return decide.error(delivery, exc)
        return decide.reply(delivery, result)
    finally:
        context.current.reset(token)
        logs.clear_request()


def _invoke(delivery: Delivery) -> Any:
    function = delivery.function
    assert function is not None
    return function(delivery.payload)


@contextlib.contextmanager
def bound(delivery: Delivery) -> Iterator[None]:
    """Around running one handler: the call context that nested calls and events inherit
    (trace id, deadline) and the fields of its log lines."""
    token = _bind(delivery, fields=True)
    try:
        yield
    finally:
        context.current.reset(token)
        logs.clear_request()


def _bind(delivery: Delivery, fields: bool) -> contextvars.Token[context.CallContext | context.HandlerCall | None]:
    """Set the call context of ``delivery`` (and bind its log ``fields``); the token resets it."""
    service, action = delivery.service, delivery.action or ""
    correlation_id = (delivery.message_id if delivery.kind == "event" else delivery.correlation_id) or ""
    trace_id = delivery.trace_id or correlation_id
    # A HandlerCall, not the CallContext itself: current_call() makes that on first use.
    token = context.current.set(context.HandlerCall(service, action, correlation_id, trace_id, delivery.deadline,
                                                    delivery))
    if fields:
        handler = {"handler": delivery.handler} if delivery.kind == "event" else {}
        logs.bind_request(service=service, action=action, correlation_id=correlation_id, trace_id=trace_id,
                          parent_id=delivery.body_headers.get("parent_id"), **handler)
    return token


def _compose(scopes: Sequence[Callable[..., Any]], innermost: Callable[[Delivery], Any]) -> Callable[[Delivery], Any]:
    """``scopes[0](scopes[1](... innermost))``: the first scope is the outermost."""
    call = innermost
    for scope in reversed(scopes):
        call = functools.partial(scope, call)
    return call


def _describe(delivery: Delivery, request: envelope.Request, consumer: EventConsumer | None) -> None:
    """Copy what the envelope says to the delivery."""
    delivery.request = request
    delivery.action = request.action
    delivery.payload = request.payload
    delivery.body_headers = request.headers
    delivery.message_id = request.message_id
    if consumer is not None:
        delivery.handler = consumer.subscription.name
        delivery.function = consumer.subscription.function
        delivery.retry = consumer.subscription.retry
        delivery.trace_id = request.trace_id or request.message_id
        return
    delivery.correlation_id = request.correlation_id
    delivery.reply_to = request.reply_to
    delivery.kind = "call" if request.reply_to else "cast"
    delivery.deadline = request.deadline
    delivery.trace_id = request.trace_id or request.correlation_id


def _outcome(delivery: Delivery, kind: OutcomeKind, error_type: str | None, dead_lettered: bool = False) -> Outcome:
    return Outcome(kind, error_type, time.perf_counter() - delivery.started, dead_lettered)


__all__ = ["UNSET", "Decision", "Dispatcher", "Retry", "bound"]
