"""Outgoing size limits, checked before anything is sent: headers that do not fit in one
frame of the connection's ``frame_max`` (RabbitMQ closes the whole connection for one, 501
FRAME_ERROR), bodies over the client's ``max_message_size`` (the broker closes the
channel, 406). Only the message at fault fails, with :class:`MessageTooLarge`; the other
calls in flight are answered, and a cast is not re-sent.

Before: the oversized header went out as is, every call in flight failed with
ConnectionLost and the cast was re-sent 5 times."""
from __future__ import annotations

import time
from typing import Any

import pytest

from amqprpc import MessageTooLarge, RpcClient, Service
from amqprpc.middleware import Middleware, Outgoing
from amqprpc.testing import running_worker

pytestmark = pytest.mark.integration

BIG = 200_000  # bytes: over RabbitMQ's default frame_max (131072)


class BigHeader(Middleware):
    """Puts a header larger than a frame on what goes to action "big" (a tracing
    middleware gone wrong, a baggage header that grew)."""

    def before_publish(self, message: Outgoing) -> None:
        if message.action == "big":
            message.headers["x-baggage"] = "x" * BIG


def _slow_echo(payload: dict) -> Any:
    time.sleep(0.5)
    return payload


def test_headers_larger_than_a_frame_fail_alone_before_sending(service, broker_url):
    service.handler("echo")(_slow_echo)
    service.handler("big")(lambda payload: "sent anyway")
    with running_worker(service, broker_url=broker_url, concurrency=4), \
            RpcClient("sizes", broker_url=broker_url, middleware=[BigHeader()]) as client:
        in_flight = [client.call_async(service.name, "echo", {"n": n}, timeout=10) for n in range(4)]
        began = time.monotonic()
        with pytest.raises(MessageTooLarge, match="frame_max") as raised:
            client.call(service.name, "big", timeout=10)
        assert raised.value.part == "headers" and raised.value.size > BIG
        with pytest.raises(MessageTooLarge):
            client.cast(service.name, "big", timeout=10)
        assert time.monotonic() - began < 1
        assert [future.result(10) for future in in_flight] == [{"n": n} for n in range(4)]
        assert client._loop.connects == 1, "the connection was lost"


def test_a_body_over_max_message_size_fails_alone_before_sending(service, broker_url):
    service.handler("echo")(_slow_echo)
    with running_worker(service, broker_url=broker_url, concurrency=4), \
            RpcClient("sizes", broker_url=broker_url, max_message_size=64 * 1024) as client:
        in_flight = [client.call_async(service.name, "echo", {"n": n}, timeout=10) for n in range(4)]
        began = time.monotonic()
        with pytest.raises(MessageTooLarge, match="max_message_size") as raised:
            client.call(service.name, "echo", {"blob": "x" * 100_000}, timeout=10)
        assert raised.value.part == "body" and raised.value.limit == 64 * 1024
        with pytest.raises(MessageTooLarge):
            client.cast(service.name, "echo", {"blob": "x" * 100_000}, timeout=10)
        with pytest.raises(MessageTooLarge):
            client.publish_event("sizes.big", {"blob": "x" * 100_000}, timeout=10)
        assert time.monotonic() - began < 1
        assert [future.result(10) for future in in_flight] == [{"n": n} for n in range(4)]
        assert client.call(service.name, "echo", {"blob": "x" * 1000}, timeout=10) == {"blob": "x" * 1000}


def test_the_default_limit_is_the_brokers_for_its_version(broker_url):
    from amqprpc.client.confirms import MAX_MESSAGE_SIZE_3, MAX_MESSAGE_SIZE_4, default_max_message_size

    assert default_max_message_size({"version": b"3.10.8"}) == MAX_MESSAGE_SIZE_3 == 128 * 1024 * 1024
    assert default_max_message_size({"version": "4.1.0"}) == MAX_MESSAGE_SIZE_4 == 16 * 1024 * 1024
    with RpcClient("sizes", broker_url=broker_url) as client:
        assert client.max_message_size in (MAX_MESSAGE_SIZE_3, MAX_MESSAGE_SIZE_4)
