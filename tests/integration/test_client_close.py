"""``RpcClient.close()`` gives back everything the client took: its socket, its loop's
wake-up pipe and its threads (loop, deadline timer, callback runner). A process that opens
a client per request (a CGI script, a test suite, a web handler done wrong) must not run
out of descriptors: before the fix each client left its 2 pipe descriptors behind, and a
process hit ``ulimit -n`` (1024) after ~500 clients."""
from __future__ import annotations

import os
import threading
import time

import pytest

from amqprpc import RpcClient, ServiceUnavailable
from amqprpc.testing import unique_name, wait_for

pytestmark = pytest.mark.integration

CLIENTS = 500


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _amqprpc_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith("amqprpc"))


def _use(client: RpcClient, nobody: str) -> None:
    """Start every thread a client may start: a call arms the deadline timer, a callback
    starts the callback runner. Nobody serves ``nobody``: the broker returns the call at once."""
    done = threading.Event()
    future = client.call_async(nobody, "x", timeout=5, callback=lambda _: done.set())
    assert done.wait(5)
    with pytest.raises(ServiceUnavailable):
        future.result()


def test_closing_500_clients_leaves_no_descriptor_and_no_thread(broker_url):
    nobody = unique_name("nobody")
    others = _amqprpc_threads()  # of earlier tests' workers and clients still ending in this session
    with RpcClient("warm-up", broker_url=broker_url) as client:  # imports, lazily built state
        _use(client, nobody)
    wait_for(lambda: _amqprpc_threads() <= others, timeout=30)
    descriptors, threads = _descriptors(), threading.active_count()
    began = time.monotonic()
    for index in range(CLIENTS):
        with RpcClient("close-test", broker_url=broker_url, connect_timeout=30) as client:
            if index % 10 == 0:
                _use(client, nobody)
    took = time.monotonic() - began
    # Threads end just after close() returns (the timer and the callback runner are not joined).
    wait_for(lambda: _amqprpc_threads() <= others, timeout=30)
    # A leak is 2 per client (1000 here); a long test session may close or open one or two of
    # its own meanwhile (a collected socket of an earlier test).
    assert _descriptors() - descriptors <= 2, f"{CLIENTS} clients left {_descriptors() - descriptors} descriptors"
    assert threading.active_count() - threads <= 0
    print(f"{CLIENTS} clients opened and closed in {took:.1f}s")
