"""Blocking callers that read their own replies (leader/follower, :mod:`amqprpc.transport.readtoken`):
with many callers at once, mixed with call_async and casts, when a leader's own call times out,
and when the broker closes the connection under a leader. (Stalled and reset links while a
caller leads: test_stalled_link.py.)"""
from __future__ import annotations

import threading
import time

import pytest

from amqprpc import RpcClient
from amqprpc.errors import CallTimeout, ConnectionLost
from amqprpc.testing import running_worker, unique_name, wait_for
from amqprpc.transport.framereader import FrameReader
from rabbit_node import suite_ctl

pytestmark = pytest.mark.integration


@pytest.fixture
def echo_worker(service):
    @service.handler
    def echo(payload):
        return payload

    @service.handler
    def nap(payload):
        time.sleep(payload["seconds"])
        return payload

    @service.handler
    def touch(payload):
        return None

    with running_worker(service, concurrency=8) as worker:
        yield worker


def readers(monkeypatch) -> set[int]:
    """The threads that read frames as leaders (only a leader calls FrameReader.frame_now)."""
    seen: set[int] = set()
    frame_now = FrameReader.frame_now

    def recorded(reader, fetch):
        seen.add(threading.get_ident())
        return frame_now(reader, fetch)

    monkeypatch.setattr(FrameReader, "frame_now", recorded)
    return seen


def lead_next_call(client: RpcClient, service: str) -> int:
    """Make the loop lend the socket (a blocking call found it reading, then nothing pending)
    and keep it lent for the next call; the leads so far."""
    client._lender.lease = 30.0  # the loop stays off the socket between calls (not waiting for a next one)
    wait_for(lambda: client.call(service, "echo", {}) == {} and client._lender.lent, timeout=5)
    return client._lender.leads


def test_many_threads_at_once_every_call_answered_and_leaders_change_hands(echo_worker, service, broker_url,
                                                                          monkeypatch):
    leaders = readers(monkeypatch)
    threads, rounds = 8, 40
    barrier = threading.Barrier(threads)
    slowest, wrong, errors = [0.0], [], []
    with RpcClient(unique_name("leaders"), broker_url=broker_url, timeout=10) as client:
        def caller(k: int) -> None:
            for n in range(rounds):
                barrier.wait(30)  # all eight call at once, every round
                started = time.monotonic()
                try:
                    if client.call(service.name, "echo", {"k": k, "n": n}) != {"k": k, "n": n}:
                        wrong.append((k, n))
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(exc)
                slowest[0] = max(slowest[0], time.monotonic() - started)

        running = [threading.Thread(target=caller, args=(k,)) for k in range(threads)]
        for thread in running:
            thread.start()
        for thread in running:
            thread.join(120)
        lender = client._lender
        report = (f"{threads}x{rounds} calls: slowest {slowest[0] * 1000:.1f} ms; lent {lender.lends}, "
                  f"led {lender.leads}, taken back {lender.reclaims}; {len(leaders)} threads led")
    print("\n" + report)
    assert not errors and not wrong, (errors[:3], wrong[:3], report)
    assert slowest[0] < 5.0, report  # none waited to its timeout (10 s)
    assert lender.leads > 0 and len(leaders) >= 2, report


def test_call_async_casts_and_blocking_calls_mixed(echo_worker, service, broker_url):
    with RpcClient(unique_name("mixed"), broker_url=broker_url, timeout=10) as client:
        slowest, errors = [0.0], []

        def blocking() -> None:
            for n in range(300):
                started = time.monotonic()
                try:
                    assert client.call(service.name, "echo", {"n": n}) == {"n": n}
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(exc)
                slowest[0] = max(slowest[0], time.monotonic() - started)

        callers = [threading.Thread(target=blocking) for _ in range(2)]
        for thread in callers:
            thread.start()
        answered: list[float] = []
        for n in range(200):
            started = time.monotonic()
            future = client.call_async(service.name, "echo", {"a": n})
            future.add_done_callback(lambda f, s=started: answered.append(time.monotonic() - s)
                                     if f.exception() is None else errors.append(f.exception()))
            if n % 20 == 0:
                client.cast(service.name, "touch", {})
            if n % 50 == 0:  # and now and then one at a time, so the loop lends in between
                wait_for(lambda: len(answered) + len(errors) > n, timeout=5)
        for thread in callers:
            thread.join(60)
        wait_for(lambda: len(answered) + len(errors) >= 200, timeout=10)
        lender = client._lender
        report = (f"slowest blocking call {slowest[0] * 1000:.1f} ms, slowest call_async {max(answered) * 1000:.1f} ms;"
                  f" lent {lender.lends}, led {lender.leads}, taken back {lender.reclaims}")
    print("\n" + report)
    assert not errors, (errors[:3], report)
    assert len(answered) == 200 and max(answered) < 5.0 and slowest[0] < 5.0, report


def test_a_leaders_own_call_times_out_on_time_and_its_late_reply_harms_nothing(echo_worker, service, broker_url):
    with RpcClient(unique_name("late"), broker_url=broker_url, timeout=10) as client:
        leads = lead_next_call(client, service.name)
        started = time.monotonic()
        with pytest.raises(CallTimeout):
            client.call(service.name, "nap", {"seconds": 1.5}, timeout=0.5)
        late = time.monotonic() - started - 0.5
        assert client._lender.leads == leads + 1  # it was the leader: its own poll ended on time
        assert late < 0.1, f"{late * 1000:.1f} ms past its timeout"
        # The late reply arrives while the next callers lead (or at the lease's end): dropped.
        assert [client.call(service.name, "echo", {"n": n}) for n in range(5)] == [{"n": n} for n in range(5)]
        assert client._loop.connects == 1


def _connection_of(client: RpcClient) -> str:
    """The broker's name (pid) of the client's AMQP connection, found by its local port."""
    port = client._loop.link.sock.getsockname()[1]
    listed = suite_ctl("-q", "list_connections", "pid", "peer_port")
    found = [fields[0] for fields in (line.split("\t") for line in listed.splitlines())
             if len(fields) == 2 and fields[1] == str(port)]
    assert found, f"no connection with peer port {port} in:\n{listed}"
    return found[0]


def test_the_broker_closing_the_connection_under_a_leader_fails_its_call_at_once_and_the_client_reconnects(
        echo_worker, service, broker_url):
    with RpcClient(unique_name("closed"), broker_url=broker_url, timeout=30, reconnect_cap=1.0) as client:
        leads = lead_next_call(client, service.name)
        connection = _connection_of(client)
        outcome: list[tuple[float, BaseException | None]] = []
        lost: list[float] = []
        on_disconnected = client._loop.on_disconnected
        client._loop.on_disconnected = lambda exc: (lost.append(time.monotonic()), on_disconnected(exc))

        def leading() -> None:
            try:
                client.call(service.name, "nap", {"seconds": 5})
            except Exception as exc:  # noqa: BLE001 - what it got
                outcome.append((time.monotonic(), exc))
            else:
                outcome.append((time.monotonic(), None))

        thread = threading.Thread(target=leading)
        thread.start()
        wait_for(lambda: client._lender.leads > leads and client._lender._token.locked(), timeout=5)
        suite_ctl("-q", "close_connection", connection, "test: closed under a leader")
        closed_by = time.monotonic()  # (rabbitmqctl takes a second or so to start: the close is in there)
        thread.join(10)
        assert outcome and lost, "the leading call did not end"
        ended, exc = outcome[0]
        assert isinstance(exc, ConnectionLost), exc
        assert "CONNECTION_FORCED" in str(exc), exc
        # The leader read the broker's close and handed it to the loop, which failed the call.
        assert lost[0] < closed_by + 0.5 and ended - lost[0] < 0.5, (lost[0] - closed_by, ended - lost[0])
        wait_for(lambda: client._loop.connected.is_set() and client._loop.connects == 2, timeout=30)
        assert [client.call(service.name, "echo", {"n": n}) for n in range(5)] == [{"n": n} for n in range(5)]


def test_a_leader_sleeping_through_lone_confirms_still_fails_a_refused_call_at_once(echo_worker, service, broker_url):
    """A leader's poll() wakes for more than a lone confirm (SO_RCVLOWAT): the nack of its own
    request, alone on the wire, is still read within milliseconds, and the socket's low-water
    mark is back to 1 for the loop once the leader leaves."""
    import socket

    from kombu import Connection, Queue

    from amqprpc import PublishRefused
    from amqprpc.testing import delete_queues
    from amqprpc.wire.topology import DEFAULT_TOPOLOGY

    refusing = unique_name("refusing")
    queue = Queue(f"service.{refusing}.request", DEFAULT_TOPOLOGY.request_exchange(),
                  routing_key=f"request.{refusing}", durable=True,
                  queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    with Connection(broker_url) as conn:
        queue(conn.channel()).declare()
    try:
        with RpcClient(unique_name("lowat"), broker_url=broker_url, timeout=10) as client:
            leads = lead_next_call(client, service.name)
            started = time.monotonic()
            with pytest.raises(PublishRefused):
                client.call(refusing, "x", timeout=10)
            took = time.monotonic() - started
            assert client._lender.leads == leads + 1  # it led, and read its nack itself
            assert took < 0.5, f"the refusal took {took * 1000:.1f} ms"
            assert client._loop.link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
            assert client.call(service.name, "echo", {"after": 1}) == {"after": 1}
    finally:
        delete_queues(queue.name, broker_url=broker_url)
