"""The client's publish chain: what a caller asks for (a call, cast, event or submit) goes
through around-middleware before any message is built (FastStream's ``publish_scope``).

    call(..., retry=)  ->  ClientRetry        every attempt within the call's one timeout
                           BreakerScope       the circuit breaker (calls only; when the client has one)
                           publish_scope      of each middleware, in list order
                           the client         builds, publishes and (blocking call) waits:
                                              before_publish / after_settle around each message

The chain is composed once per client (:class:`PublishChain`) and again only when its
breaker is replaced. A client with no breaker and no middleware overriding
``publish_scope`` has an empty chain (:attr:`PublishChain.bare`): its calls go straight to
the last stage without a :class:`~amqprpc.middleware.PublishCommand` being built, unless
the call itself asks for ``retry``.
"""
from __future__ import annotations

import functools
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from amqprpc.client.breaker import CircuitBreaker
from amqprpc.errors import CircuitOpen
from amqprpc.middleware import Middleware, PublishCommand
from amqprpc.retry import call_with_retry

Send = Callable[[PublishCommand], Any]
Scope = Callable[[Send, PublishCommand], Any]


class ClientRetry(Middleware):
    """``call(..., retry=Retry(...))``: re-sends a blocking call after CallTimeout or
    ServiceUnavailable with the policy's backoff, never after CircuitOpen, all attempts
    within the call's timeout (:func:`amqprpc.retry.call_with_retry`). Each attempt is a new
    message (a new message id; the same idempotency key). Anything else passes through."""

    def publish_scope(self, call_next: Send, command: PublishCommand) -> Any:
        if command.retry is None or not command.blocking:
            return call_next(command)

        def attempt(left: float) -> Any:
            command.timeout = left
            return call_next(command)

        return call_with_retry(attempt, command.retry, command.timeout)


class BreakerScope(Middleware):
    """A client's :class:`~amqprpc.client.breaker.CircuitBreaker` around its calls (casts,
    events and submits pass): a refused call is never sent; ``on_reject(service, action,
    exc)`` is told first (the client's ``after_settle`` hooks). An asynchronous call's
    outcome is recorded by a done-callback ``defer``-red off the thread that resolves it."""

    def __init__(self, breaker: CircuitBreaker, on_reject: Callable[[str, str, CircuitOpen], Any] | None,
                 defer: Callable[[Callable[[Future[Any]], Any]], Callable[[Future[Any]], Any]]) -> None:
        self.breaker, self.on_reject, self.defer = breaker, on_reject, defer

    def publish_scope(self, call_next: Send, command: PublishCommand) -> Any:
        if command.kind != "call":
            return call_next(command)
        service, action = command.service or "", command.action
        send = functools.partial(call_next, command)
        if command.blocking:
            return self.breaker.call(service, action, command.payload, send, on_reject=self.on_reject)
        return self.breaker.call_async(service, action, command.payload, send, self.defer, on_reject=self.on_reject)


class PublishChain:
    """The stages of one client's publish chain, composed once: ``ClientRetry``, the
    breaker's scope (when there is a breaker), then ``scopes`` (the middleware's
    ``publish_scope`` hooks, in list order), ending in ``send``. ``bare``: no stage but the
    retry (which passes every call that does not ask for one)."""

    def __init__(self, send: Send, scopes: Sequence[Scope], breaker: BreakerScope | None = None) -> None:
        stages: list[Scope] = [ClientRetry().publish_scope]
        if breaker is not None:
            stages.append(breaker.publish_scope)
        stages.extend(scopes)
        self.bare = len(stages) == 1
        self.run: Send = compose(stages, send)


def compose(stages: Sequence[Scope], innermost: Send) -> Send:
    """``stages[0]`` outermost: each gets the rest of the chain as its ``call_next``."""
    call = innermost
    for stage in reversed(stages):
        call = functools.partial(stage, call)
    return call
