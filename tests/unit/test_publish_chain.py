"""The client's publish chain, composed without a broker: retry outermost, then the breaker,
then the middleware's publish_scope in list order; a chain with nothing in it is bare."""
from __future__ import annotations

from typing import Any

import pytest

from amqprpc import CallTimeout, CircuitBreaker, CircuitOpen, Retry
from amqprpc.client.publishing import BreakerScope, PublishChain
from amqprpc.middleware import Hooks, Middleware, PublishCommand


class Journal(Middleware):
    def __init__(self, name: str, journal: list[Any]) -> None:
        self.name, self.journal = name, journal

    def publish_scope(self, call_next, command):
        self.journal.append((self.name, command.kind, command.timeout))
        return call_next(command)


def chain_of(send, *middleware: Middleware, breaker: CircuitBreaker | None = None) -> PublishChain:
    hooks = Hooks(list(middleware), defaults=False)
    scope = None if breaker is None else BreakerScope(breaker, None, lambda fn: fn)
    return PublishChain(send, hooks.publish_scope, scope)


def test_a_client_with_no_breaker_and_no_scope_has_a_bare_chain():
    assert chain_of(lambda command: None).bare
    assert chain_of(lambda command: None, Middleware()).bare  # overrides no scope
    assert not chain_of(lambda command: None, Journal("j", [])).bare
    assert not chain_of(lambda command: None, breaker=CircuitBreaker(shared=False)).bare


def test_scopes_run_in_list_order_around_the_send_and_may_change_the_command():
    journal: list[Any] = []

    class Lower(Middleware):
        def publish_scope(self, call_next, command):
            command.timeout = min(command.timeout, 1.0)
            command.options["priority"] = 3
            return call_next(command)

    def send(command):
        journal.append(("send", command.options["priority"], command.timeout))
        return "data"

    chain = chain_of(send, Journal("outer", journal), Lower(), Journal("inner", journal))
    assert chain.run(PublishCommand("call", "svc", "get", {}, 5.0, options={"priority": None})) == "data"
    assert journal == [("outer", "call", 5.0), ("inner", "call", 1.0), ("send", 3, 1.0)]


def test_the_retry_re_runs_the_scopes_once_per_attempt_within_the_one_timeout():
    journal: list[Any] = []
    attempts: list[float] = []

    def send(command):
        attempts.append(command.timeout)
        if len(attempts) < 3:
            raise CallTimeout("slow")
        return "third time"

    chain = chain_of(send, Journal("scope", journal))
    retry = Retry(max_attempts=3, base_delay=0.001, jitter=False)
    assert chain.run(PublishCommand("call", "svc", "get", {}, 3.0, retry)) == "third time"
    assert len(journal) == 3 and len(attempts) == 3
    # each attempt gets a share of what is left of the call's one timeout (a third at first)
    assert attempts[0] <= 1.0 + 1e-6 and all(left <= 3.0 for left in attempts)
    attempts.clear()
    send_async = chain_of(lambda command: attempts.append(command.timeout) or "a future")
    # call_async is never retried (its Future settles later): the retry passes it on once
    assert send_async.run(PublishCommand("call", "svc", "get", {}, 3.0, retry, blocking=False)) == "a future"
    assert attempts == [3.0]


def test_the_breaker_sits_inside_the_retry_and_outside_the_scopes():
    journal: list[Any] = []
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=60, shared=False)

    def send(command):
        if command.kind == "call":
            raise CallTimeout("nobody answers")
        return "cast sent"

    chain = chain_of(send, Journal("scope", journal), breaker=breaker)
    retry = Retry(max_attempts=3, base_delay=0.001, jitter=False)
    with pytest.raises(CircuitOpen):  # attempt 1 times out and opens it; attempt 2 is refused, not retried
        chain.run(PublishCommand("call", "svc", "get", {}, 3.0, retry))
    assert len(journal) == 1  # the refused attempt never reached the scope
    assert chain.run(PublishCommand("cast", "svc", "get", {}, 3.0)) == "cast sent"  # casts pass the breaker
    assert journal[-1] == ("scope", "cast", 3.0)
