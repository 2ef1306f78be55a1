"""One lifecycle each, and small public surfaces: the connection loop is held, not inherited."""
from __future__ import annotations

import threading

import pytest

from amqprpc import RpcClient, Service, ServiceUnavailable, Worker
from amqprpc.ops.collector import Collector
from amqprpc.transport.ioloop import AmqpLoop
from amqprpc.client.responses import ResponseStore

CLOSED_PORT_URL = "amqp://guest:guest@127.0.0.1:1//"


@pytest.mark.parametrize("cls", [RpcClient, Worker, Collector])
def test_the_loop_is_held_not_inherited(cls):
    assert not issubclass(cls, AmqpLoop)
    leaked = {"call_soon", "on_tick", "write_lock", "generation", "on_connected", "on_disconnected", "consume",
              "keep_consuming", "startup_wait", "on_connect_retry", "reconnect_cap"}
    assert leaked & set(dir(cls)) == set()


def test_a_client_has_no_second_lifecycle():
    assert not hasattr(RpcClient, "start") and not hasattr(RpcClient, "stop")
    assert hasattr(RpcClient, "close") and hasattr(RpcClient, "__exit__")


def _threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("amqprpc-")}


def test_a_failed_worker_start_leaves_no_thread_behind():
    before = _threads()
    worker = Worker(Service("lifecycle-svc"), broker_url=CLOSED_PORT_URL, concurrency=4)
    with pytest.raises(OSError):
        worker.start()
    assert _threads() - before == set()
    assert not worker.alive


def test_a_failed_collector_start_leaves_no_thread_behind():
    before = _threads()
    collector = Collector(ResponseStore(), broker_url=CLOSED_PORT_URL)
    with pytest.raises(OSError):
        collector.start()
    assert _threads() - before == set()


def test_a_client_that_cannot_connect_raises_at_construction_and_leaves_no_thread():
    before = _threads()
    with pytest.raises(ServiceUnavailable):
        RpcClient("lifecycle", broker_url=CLOSED_PORT_URL, connect_timeout=1)
    assert _threads() - before == set()
