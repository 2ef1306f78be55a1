"""The hot path publishes from callers' and handlers' threads (under AmqpLoop.write_lock)
and reads frames through FrameReader: both must survive a connection dropped mid-flight."""
import socket
import threading
from concurrent.futures import wait

import pytest

from amqprpc import RpcClient
from amqprpc.errors import CallTimeout, ServiceUnavailable
from amqprpc.transport.framereader import FrameReader
from amqprpc.testing import running_worker, wait_for

pytestmark = pytest.mark.integration


def _drop(owner) -> None:
    """Cut the TCP connection under a client or worker, as a broker restart or a network fault would."""
    owner._loop.connection.connection.transport.sock.shutdown(socket.SHUT_RDWR)


def test_calls_in_flight_across_dropped_connections_all_resolve_and_calls_work_after(service, broker_url):
    service.handler("echo")(lambda payload: payload["n"])
    with running_worker(service, concurrency=8, prefetch=64) as worker, \
            RpcClient("hotpath", broker_url=broker_url) as client:
        assert isinstance(worker._loop.connection.connection.transport._read.__self__, FrameReader)
        for victim in (client, worker, client):
            generation = victim._loop.generation
            futures = [client.call_async(service.name, "echo", {"n": n}, timeout=5) for n in range(300)]
            _drop(victim)
            done, not_done = wait(futures, timeout=30)
            assert not not_done  # no call is left hanging
            for future in done:
                exc = future.exception()
                assert exc is None or isinstance(exc, (ServiceUnavailable, CallTimeout)), repr(exc)
            wait_for(lambda: victim._loop.generation > generation and victim._loop.connected.is_set(), timeout=30)
            wait_for(lambda: worker._loop.connected.is_set() and worker.channel is not None, timeout=30)
            assert client.call(service.name, "echo", {"n": 7}, timeout=10) == 7


def test_many_threads_publishing_at_once_never_interleave_frames(service, broker_url):
    # 16 threads publish on one connection at the same time: a torn frame would make the
    # broker close the connection (and the calls fail) or deliver a garbled body.
    service.handler("echo")(lambda payload: payload)
    wrong, errors = [], []
    body = {"blob": "x" * 20000}  # several KiB: long writes, more chance to interleave

    def caller(thread_no: int) -> None:
        for n in range(40):
            try:
                if client.call(service.name, "echo", {**body, "t": thread_no, "n": n}, timeout=20) != \
                        {**body, "t": thread_no, "n": n}:
                    wrong.append((thread_no, n))
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    with running_worker(service, concurrency=8), RpcClient("hotpath", broker_url=broker_url) as client:
        generation = client._loop.generation
        threads = [threading.Thread(target=caller, args=(t,)) for t in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert client._loop.generation == generation  # never reconnected
    assert errors == [] and wrong == []
