"""Channels the broker closes, on a RabbitMQ node of this module's own with a short
``consumer_timeout`` (2 s, checked every 0.5 s): a handler that outlives it, a user who
may not publish, all against the real broker's behaviour.

Before: py-amqp reopened the closed channel silently (no consumer, no confirms) and the
loop lost the broker's error, so a worker ran on with 0 consumers and logged nothing, and
a client's calls waited out their timeouts. Now the close is logged with the broker's
reply code and text, a worker consumes again (the message it was handling runs again:
at-least-once), a client's calls fail at once with the reason and work again once the
cause is gone."""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import pytest
from kombu import Connection

from amqprpc import AccessRefused, CallTimeout, RpcClient, Service, ServiceUnavailable
from amqprpc.testing import capture_logs, running_worker, unique_name, wait_for

from rabbit_node import RabbitNode

pytestmark = pytest.mark.integration

CONSUMER_TIMEOUT_S = 2.0
MAX_MESSAGE_SIZE = 1024 * 1024  # the broker's; the client is not told


@pytest.fixture(scope="module")
def strict_broker() -> Iterator[RabbitNode]:
    """A node whose consumer_timeout is 2 s (30 min by default), checked every 0.5 s
    (every 60 s by default: ``channel_tick_interval``), and whose max_message_size is 1 MiB."""
    node = RabbitNode(label="timeouts", config=f"consumer_timeout = {int(CONSUMER_TIMEOUT_S * 1000)}\n"
                      f"max_message_size = {MAX_MESSAGE_SIZE}\n",
                      advanced="{channel_tick_interval, 500}")
    node.start()
    yield node
    node.stop()


def _queue_counts(url: str, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of ``queue``."""
    with Connection(url) as conn:
        declared = conn.channel().queue_declare(queue, passive=True)
        return declared.message_count, declared.consumer_count


def _closes(logged: list[dict[str, Any]], code: int) -> list[dict[str, Any]]:
    return [line for line in logged if line["event"] == "broker closed a channel" and line.get("reply_code") == code]


def test_a_handler_outliving_consumer_timeout_is_logged_consumed_again_and_not_lost(strict_broker):
    url = strict_broker.url
    service = Service(unique_name("long-task"))
    started: list[float] = []
    finished: list[float] = []

    @service.handler("work")
    def work(payload: dict) -> str:
        started.append(time.monotonic())
        if len(started) == 1:
            time.sleep(CONSUMER_TIMEOUT_S * 2)  # the broker closes the channel meanwhile
        finished.append(time.monotonic())
        return "done"

    queue = f"service.{service.name}.request"
    with capture_logs() as logged, running_worker(service, broker_url=url, concurrency=2) as worker, \
            RpcClient("long-tasks", broker_url=url) as client:
        client.cast(service.name, "work", {})
        # The first run's channel was closed under it: its ack is dropped, the broker
        # requeued the message, a fresh channel consumes it again and the second run settles it.
        wait_for(lambda: len(finished) >= 2, timeout=30)
        closes = _closes(logged, 406)
        assert closes and "timed out" in closes[0]["reply_text"], logged
        assert any(line["event"].startswith("the broker closed the consuming channel") for line in logged)
        wait_for(lambda: _queue_counts(url, queue) == (0, 1), timeout=10)  # consumed again, nothing left behind
        assert worker.alive and worker.stats["channels_lost"] == 1
        # ... and the worker serves as before.
        assert client.call(service.name, "work", {}, timeout=10) == "done"
    assert len(started) == 3


def _user(node: RabbitNode, write: str) -> str:
    """A user of ``node`` who may configure and read everything and write to what matches
    ``write``; returns its URL."""
    name = unique_name("user")
    node.ctl("add_user", name, "secret")
    node.ctl("set_permissions", "-p", "/", name, ".*", write, ".*")
    return f"amqp://{name}:secret@127.0.0.1:{node.port}//"


def test_a_client_refused_the_exchange_fails_at_once_and_works_once_permitted(strict_broker):
    url = strict_broker.url
    service = Service(unique_name("guarded"))
    service.handler("ping")(lambda payload: "pong")
    limited = _user(strict_broker, write="^$")  # may publish nowhere
    with running_worker(service, broker_url=url), RpcClient("refused", broker_url=limited) as client:
        for attempt in range(2):  # the first refusal closes a channel; the next call uses a fresh one
            began = time.monotonic()
            with pytest.raises(AccessRefused, match="ACCESS_REFUSED.*service.exchange"):
                client.call(service.name, "ping", timeout=10)
            assert time.monotonic() - began < 2, "a refused call waited for its timeout"
        began = time.monotonic()
        with pytest.raises(AccessRefused, match="ACCESS_REFUSED"):
            client.cast(service.name, "ping", timeout=10)
        assert time.monotonic() - began < 2, "a refused cast was re-sent"
        name = limited.split("//")[1].split(":")[0]
        strict_broker.ctl("set_permissions", "-p", "/", name, ".*", ".*", ".*")
        # No restart: the next channel is checked against the new permissions.
        assert client.call(service.name, "ping", timeout=10) == "pong"
        client.cast(service.name, "ping", timeout=10)


def test_a_worker_that_may_not_reply_says_so_and_keeps_consuming(strict_broker):
    url = strict_broker.url
    service = Service(unique_name("mute"))
    service.handler("ping")(lambda payload: "pong")
    mute = _user(strict_broker, write=r"^(?!amq\.default$).*")  # everything but the default exchange: no replies
    queue = f"service.{service.name}.request"
    with capture_logs() as logged, running_worker(service, broker_url=mute), \
            RpcClient("asks-mute", broker_url=url) as client:
        with pytest.raises(CallTimeout):
            client.call(service.name, "ping", timeout=2)
        closes = _closes(logged, 403)
        assert closes and "amq.default" in closes[0]["reply_text"], logged
        wait_for(lambda: _queue_counts(url, queue)[1] == 1, timeout=15)  # never left with 0 consumers


def test_a_body_the_broker_refuses_fails_at_once_with_its_reason_and_is_not_re_sent(strict_broker):
    """The client's max_message_size left at its default (128 MiB on 3.x) while the broker
    takes 1 MiB: the broker closes the channel (406); the call or cast fails at once with
    the broker's words, is not re-sent, and the next one goes on a fresh channel."""
    url = strict_broker.url
    service = Service(unique_name("sizes"))
    service.handler("echo")(lambda payload: payload)
    blob = {"blob": "x" * (2 * MAX_MESSAGE_SIZE)}
    with running_worker(service, broker_url=url), RpcClient("too-big", broker_url=url) as client:
        for send in (lambda: client.call(service.name, "echo", blob, timeout=10),
                     lambda: client.cast(service.name, "echo", blob, timeout=10)):
            began = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="larger than configured max size"):
                send()
            assert time.monotonic() - began < 2
        assert client.channels_replaced == {"call": 1, "confirm": 1}  # one attempt each: not re-sent
        assert client.call(service.name, "echo", {"n": 1}, timeout=10) == {"n": 1}
        client.cast(service.name, "echo", {"n": 2}, timeout=10)


def test_a_consumer_timeout_policy_lets_a_long_handler_finish_once(strict_broker):
    """What docs/guides/long-tasks.md advises: a ``consumer-timeout`` policy on the queues
    of long tasks (RabbitMQ 3.12 and later) lets a handler outlive the broker-wide timeout:
    it runs once, nothing is closed. Skipped on older brokers, which have only the setting."""
    version = tuple(int(part) for part in strict_broker.version().split(".")[:2])
    if version < (3, 12):
        pytest.skip(f"RabbitMQ {strict_broker.version()} has no per-queue consumer-timeout")
    url = strict_broker.url
    service = Service(unique_name("policy-task"))
    runs: list[float] = []

    @service.handler("work")
    def work(payload: dict) -> str:
        runs.append(time.monotonic())
        time.sleep(CONSUMER_TIMEOUT_S * 2)
        return "done"

    queue = f"service.{service.name}.request"
    strict_broker.ctl("set_policy", "long-tasks", f"^{queue}$".replace(".", r"\."), '{"consumer-timeout": 60000}',
                      "--apply-to", "queues")
    try:
        with capture_logs() as logged, running_worker(service, broker_url=url) as worker, \
                RpcClient("long-tasks", broker_url=url) as client:
            assert client.call(service.name, "work", {}, timeout=20) == "done"
            assert len(runs) == 1 and worker.stats["channels_lost"] == 0
            assert not _closes(logged, 406)
    finally:
        strict_broker.ctl("clear_policy", "long-tasks")
