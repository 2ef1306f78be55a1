"""Stalled, slow and reset links: no call of any kind outlives its timeout by more than
0.5 s, a dead link is found within two heartbeat intervals and a second, and every call
pending on it fails at once.

An RpcClient, an AsyncRpcClient and a real worker process reach a RabbitMQ node of this
session's own (``own_broker``, never the shared one) through a TCP proxy the test steers
(:mod:`faultproxy`): blackhole (nothing moves, every socket stays open), reset, delay.
"""
from __future__ import annotations

import asyncio
import collections
import datetime
import signal
import threading
import time

import pytest

from amqprpc import AsyncRpcClient, RpcClient
from amqprpc.errors import ConnectionLost, ServiceUnavailable
from amqprpc.testing import delete_queues, unique_name, wait_for
from amqprpc.wire.topology import DEFAULT_TOPOLOGY
from faultproxy import FaultProxy
from workerproc import WorkerProcess

pytestmark = pytest.mark.integration

HEARTBEAT = 2.0
DETECT_WITHIN = 2 * HEARTBEAT + 1.0  # what the issue allows for finding a dead link
LATE_LIMIT = 0.5  # the most any call may stay unresolved past its timeout
TIMEOUT = 2.0


@pytest.fixture(scope="module")
def proxy(own_broker):
    fault_proxy = FaultProxy(own_broker.port)
    yield fault_proxy
    fault_proxy.close()


@pytest.fixture(scope="module")
def svc(own_broker):
    name = unique_name("stall")
    yield name
    own_broker.ensure_running()
    request = DEFAULT_TOPOLOGY.request_queue_format.format(service=name)
    event = DEFAULT_TOPOLOGY.event_queue_format.format(service=name, handler="seen")
    delete_queues(request, event, *DEFAULT_TOPOLOGY.retry_queue_names(name, [request, event]), broker_url=own_broker.url)


@pytest.fixture(scope="module")
def worker(proxy, svc, own_broker, tmp_path_factory):
    process = WorkerProcess(svc, str(tmp_path_factory.mktemp("stall") / "worker.log"), "--heartbeat", str(HEARTBEAT),
                            "--reconnect-cap", "1", "--concurrency", "8", app="hostile_app:service",
                            broker_url=proxy.url(own_broker.url))
    process.wait_event("worker ready")
    yield process
    proxy.heal()
    process.process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, process.text()


class AsyncClientThread:
    """An AsyncRpcClient on an asyncio loop of its own thread, as in a web server."""

    def __init__(self, **options):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.client = AsyncRpcClient(**options)
        self.run(self.client.connect()).result(30)

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        self.run(self.client.close()).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def clients(proxy, own_broker, worker, svc):
    proxy.heal()
    proxy.delay(0)
    url = proxy.url(own_broker.url)
    client = RpcClient("stall", broker_url=url, heartbeat=HEARTBEAT, connect_timeout=2.0, reconnect_cap=1.0)
    aio = AsyncClientThread(source="stall-aio", broker_url=url, heartbeat=HEARTBEAT, connect_timeout=2.0,
                            reconnect_cap=1.0)
    wait_for(lambda: _answers(client, svc), timeout=30)  # the worker is back from an earlier fault
    yield client, aio
    proxy.heal()
    proxy.delay(0)
    aio.close()
    client.close()


def _answers(client, svc) -> bool:
    try:
        return client.call(svc, "echo", {"ping": 1}, timeout=2) == {"ping": 1}
    except Exception:  # noqa: BLE001 - not yet
        return False


class Tally:
    """Every call a load made: how it ended, and how long each kind stayed unresolved
    past its timeout at worst (negative: it ended before)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.late: dict[str, float] = collections.defaultdict(lambda: -1e9)
        self.outcomes: collections.Counter = collections.Counter()
        self.ended = 0
        self.returned = 0.0  # the longest a call_async took to return

    def done(self, kind: str, started: float, timeout: float, exc: BaseException | None) -> None:
        late = time.monotonic() - started - timeout
        with self._lock:
            self.late[kind] = max(self.late[kind], late)
            self.outcomes[(kind, "answered" if exc is None else type(exc).__name__)] += 1
            self.ended += 1

    def worst(self) -> float:
        return max(self.late.values())

    def summary(self) -> str:
        late = ", ".join(f"{kind} {value:+.3f}s" for kind, value in sorted(self.late.items()))
        ended = ", ".join(f"{kind} {outcome} {n}" for (kind, outcome), n in sorted(self.outcomes.items()))
        return f"worst past timeout: {late}; outcomes: {ended}"


def load(client: RpcClient, aio: AsyncClientThread | None, svc: str, tally: Tally, timeout: float, n: int = 16,
         payload: dict | None = None) -> float:
    """Calls of every kind at once: call_async (its Future and its callback), call and
    cast from threads, AsyncRpcClient.call and cast (unless ``aio`` is None). Returns once
    every one ended; the result is the longest any call_async took to return (it must
    never block on the network)."""
    expected = 2 * n + 2 * 4 + (4 + n // 2 if aio else 0)
    slowest_return = 0.0
    for i in range(n):
        started = time.monotonic()
        future = client.call_async(svc, "echo", payload or {"i": i}, timeout=timeout,
                                   callback=lambda f, s=started: tally.done("call_async callback", s, timeout,
                                                                            f.exception()))
        slowest_return = max(slowest_return, time.monotonic() - started)
        future.add_done_callback(lambda f, s=started: tally.done("call_async", s, timeout, f.exception()))

    def blocking(kind, fn) -> None:
        started = time.monotonic()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - counted
            tally.done(kind, started, timeout, exc)
        else:
            tally.done(kind, started, timeout, None)

    threads = []
    for i in range(4):
        threads.append(threading.Thread(target=blocking, args=("call", lambda: client.call(
            svc, "echo", {"i": i}, timeout=timeout))))
        threads.append(threading.Thread(target=blocking, args=("cast", lambda: client.cast(
            svc, "touch", {}, timeout=timeout))))
        if aio is not None:
            threads.append(threading.Thread(target=blocking, args=("AsyncRpcClient.cast", lambda: aio.run(
                aio.client.cast(svc, "touch", {}, timeout=timeout)).result(timeout + 10))))
    for thread in threads:
        thread.start()

    async def async_call(i: int) -> None:
        started = time.monotonic()
        try:
            await aio.client.call(svc, "echo", {"i": i}, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - counted
            tally.done("AsyncRpcClient.call", started, timeout, exc)
        else:
            tally.done("AsyncRpcClient.call", started, timeout, None)

    for i in range(n // 2 if aio else 0):
        aio.run(async_call(i))
    wait_for(lambda: tally.ended >= expected, timeout=timeout + 15)
    for thread in threads:
        thread.join(5)
    return slowest_return


def lost_at(process: WorkerProcess, after: float, event: str = "broker connection lost") -> float | None:
    """Wall-clock time of the worker's first ``event`` log line after ``after``."""
    for line in process.events(event):
        stamp = datetime.datetime.strptime(line["timestamp"][:26].rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f")
        when = stamp.replace(tzinfo=datetime.timezone.utc).timestamp()
        if when >= after:
            return when
    return None


def watch_losses(rpc: RpcClient) -> list[float]:
    """When ``rpc`` found its connection lost (monotonic), each time."""
    times: list[float] = []
    loop = rpc._loop  # the connection it holds calls this back as soon as it finds the link dead
    on_disconnected = loop.on_disconnected

    def record(exc):
        times.append(time.monotonic())
        on_disconnected(exc)

    loop.on_disconnected = record
    return times


def test_a_blackholed_link_holds_every_timeout_and_is_found_dead_within_two_heartbeats(
        proxy, worker, clients, svc, own_broker):
    client, aio = clients
    flooder = RpcClient("stall-flood", broker_url=proxy.url(own_broker.url), heartbeat=HEARTBEAT, connect_timeout=2.0)
    losses = {"client": watch_losses(client), "async client": watch_losses(aio.client.client),
              "flooding client": watch_losses(flooder)}
    connects = client._loop.connects, aio.client.client._loop.connects
    worker_losses = len(worker.events("broker connection lost"))
    tally, flood = Tally(), Tally()
    began, began_wall = time.monotonic(), time.time()
    proxy.blackhole()
    # 16 MB of calls fill every socket buffer on the way: the callers must still return at
    # once. (py-amqp's TCP_USER_TIMEOUT of 1 s then ends that connection: ETIMEDOUT.)
    flooding = threading.Thread(target=lambda: setattr(flood, "returned", load(
        flooder, None, svc, flood, TIMEOUT, n=256, payload={"blob": "x" * 65536})))
    flooding.start()
    slowest_return = load(client, aio, svc, tally, TIMEOUT)
    flooding.join(30)
    wait_for(lambda: all(losses.values()), timeout=DETECT_WITHIN + 5)
    worker.wait_event("broker connection lost", count=worker_losses + 1, timeout=DETECT_WITHIN + 5)
    detected = {who: times[0] - began for who, times in losses.items()}
    detected["worker"] = lost_at(worker, began_wall) - began_wall
    # Dead and still blackholed (reconnect attempts hang in the proxy's backlog): calls fail at once.
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        client.call(svc, "echo", {}, timeout=30)
    fail_fast = time.monotonic() - started
    while_down = Tally()
    load(client, aio, svc, while_down, TIMEOUT, n=4)
    proxy.heal()
    wait_for(lambda: client._loop.connected.is_set() and aio.client.client._loop.connected.is_set(), timeout=30)
    worker.wait_event("broker reconnected", count=worker_losses + 1, timeout=30)
    answered_after = sum(client.call(svc, "echo", {"n": n}, timeout=10) == {"n": n} for n in range(5))
    # Connections served, not attempts: the broker may still hold the dead connection's exclusive
    # reply queue (RESOURCE_LOCKED) until its own heartbeat ends it, and a set-up is retried once.
    reconnects = (client._loop.connects - connects[0], aio.client.client._loop.connects - connects[1],
                  len(worker.events("broker reconnected")) - worker_losses)
    flooder.close()
    report = (f"blackhole: dead link found after {', '.join(f'{who} {t:.2f}s' for who, t in detected.items())} "
              f"(limit {DETECT_WITHIN}s); slowest call_async return {slowest_return * 1000:.1f} ms, flooding "
              f"{flood.returned * 1000:.1f} ms; a call while down failed in {fail_fast * 1000:.1f} ms; reconnects "
              f"(client, async client, worker) {reconnects}; good calls answered after {answered_after}/5\n"
              f"  load: {tally.summary()}\n  flood ({flood.ended}): {flood.summary()}\n"
              f"  while down: {while_down.summary()}")
    print("\n" + report)
    for each in (flood, tally, while_down):
        assert each.worst() <= LATE_LIMIT, report
    assert tally.outcomes[("call_async", "answered")] == 0, report  # nothing got through the blackhole
    # A write blocked on the full socket would hold its caller until py-amqp's TCP_USER_TIMEOUT
    # (1 s) ended the connection; what is left is the GIL shared with the flooding thread.
    assert slowest_return < 0.5 and flood.returned < 0.5, report
    assert max(detected.values()) <= DETECT_WITHIN, report
    assert fail_fast < 0.5, report
    assert "the link is dead" in worker.events("broker connection lost")[worker_losses]["error"]
    assert answered_after == 5 and reconnects == (1, 1, 1), report


def test_a_reset_link_fails_every_pending_call_at_once_and_reconnects(proxy, worker, clients, svc):
    client, aio = clients
    connects = client._loop.connects
    losses = len(worker.events("broker connection lost"))
    ended: list[tuple[float, BaseException | None]] = []
    in_flight = [client.call_async(svc, "nap", {"seconds": 2}, timeout=30) for _ in range(8)]
    for future in in_flight:
        future.add_done_callback(lambda f: ended.append((time.monotonic(), f.exception())))
    wait_for(lambda: len(client._pending) == 8, timeout=5)  # noqa: SLF001 - all sent and waiting
    reset_at = time.monotonic()
    proxy.reset()
    tally = Tally()
    load(client, aio, svc, tally, TIMEOUT)  # through the reset and the reconnect
    wait_for(lambda: len(ended) == 8, timeout=5)
    slowest_failure = max(when for when, _ in ended) - reset_at
    errors = {str(exc) for _, exc in ended}
    wait_for(lambda: client._loop.connected.is_set() and client._loop.connects == connects + 1, timeout=30)
    worker.wait_event("broker reconnected", count=losses + 1, timeout=30)
    answered_after = sum(client.call(svc, "echo", {"n": n}, timeout=10) == {"n": n} for n in range(5))
    worker_error = worker.events("broker connection lost")[losses]["error"]
    print(f"\nreset: 8 pending calls failed within {slowest_failure * 1000:.0f} ms of the reset ({errors}); "
          f"worker: {worker_error}; good calls answered after {answered_after}/5\n  load: {tally.summary()}")
    assert all(isinstance(exc, ConnectionLost) for _, exc in ended)
    assert slowest_failure <= LATE_LIMIT
    assert all("connection reset by the peer" in text or "closed the TCP connection" in text for text in errors)
    assert "reset" in worker_error or "closed the TCP connection" in worker_error
    assert tally.worst() <= LATE_LIMIT, tally.summary()
    assert answered_after == 5


def test_a_slow_link_answers_what_fits_its_timeout_and_times_out_the_rest_on_time(proxy, worker, clients, svc):
    client, aio = clients
    generation = client._loop.generation
    losses = len(worker.events("broker connection lost"))
    proxy.delay(0.3)  # each way: 0.6 s more per round trip
    roomy, tight = Tally(), Tally()
    load(client, aio, svc, roomy, 4.0)
    load(client, aio, svc, tight, 0.4)
    print(f"\ndelay 0.3 s each way:\n  timeout 4 s: {roomy.summary()}\n  timeout 0.4 s: {tight.summary()}")
    assert roomy.worst() <= LATE_LIMIT and tight.worst() <= LATE_LIMIT
    assert roomy.outcomes[("call_async", "answered")] == 16  # a slow link is not a dead one
    assert tight.outcomes[("call_async", "CallTimeout")] == 16
    assert client._loop.generation == generation and len(worker.events("broker connection lost")) == losses


def _leading(client: RpcClient, svc: str, seconds: float, timeout: float) -> tuple[threading.Thread, list]:
    """A blocking call that reads its own reply (the socket lent to it, readtoken): started on a
    thread of its own once the loop lent the socket; returns the thread and its outcome."""
    lender = client._lender
    lender.lease = 30.0  # the loop stays off the socket between the calls below
    wait_for(lambda: client.call(svc, "echo", {}, timeout=TIMEOUT) == {} and lender.lent, timeout=5)
    leads, outcome = lender.leads, []

    def call() -> None:
        started = time.monotonic()
        try:
            client.call(svc, "nap", {"seconds": seconds}, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - what it got
            outcome.append((started, time.monotonic(), exc))
        else:
            outcome.append((started, time.monotonic(), None))

    thread = threading.Thread(target=call)
    thread.start()
    wait_for(lambda: lender.leads > leads and lender._token.locked(), timeout=5)  # it leads
    return thread, outcome


def test_a_caller_leading_on_a_blackholed_link_gets_connection_lost_once_the_link_is_found_dead(
        proxy, worker, clients, svc):
    client, _ = clients
    losses, connects = watch_losses(client), client._loop.connects
    thread, outcome = _leading(client, svc, 1.0, 30.0)
    began = time.monotonic()
    proxy.blackhole()
    short = Tally()  # a second caller, its timeout short: on time whoever reads
    threading.Thread(target=lambda: short.done("call", time.monotonic(), TIMEOUT, _error_of(
        lambda: client.call(svc, "echo", {}, timeout=TIMEOUT)))).start()
    thread.join(DETECT_WITHIN + 5)
    wait_for(lambda: short.ended == 1, timeout=TIMEOUT + 5)
    assert outcome and losses, (outcome, losses)
    _, ended, exc = outcome[0]
    detected = losses[0] - began
    report = (f"dead link found after {detected:.2f}s (limit {DETECT_WITHIN}s); the leader's call ended "
              f"{(ended - losses[0]) * 1000:.0f} ms after: {exc!r}; {short.summary()}")
    print("\n" + report)
    proxy.heal()
    wait_for(lambda: client._loop.connected.is_set() and client._loop.connects == connects + 1, timeout=30)
    assert isinstance(exc, ConnectionLost) and "the link is dead" in str(exc), report
    assert detected <= DETECT_WITHIN and ended - losses[0] <= LATE_LIMIT, report
    assert short.worst() <= LATE_LIMIT, report
    assert sum(client.call(svc, "echo", {"n": n}, timeout=10) == {"n": n} for n in range(5)) == 5


def test_a_reset_under_a_leading_caller_fails_its_call_at_once_and_the_client_reconnects(
        proxy, worker, clients, svc):
    client, _ = clients
    connects = client._loop.connects
    thread, outcome = _leading(client, svc, 2.0, 30.0)
    reset_at = time.monotonic()
    proxy.reset()
    thread.join(10)
    assert outcome
    _, ended, exc = outcome[0]
    print(f"\nreset under a leader: its call ended {(ended - reset_at) * 1000:.0f} ms after: {exc!r}")
    assert isinstance(exc, ConnectionLost) and ended - reset_at <= LATE_LIMIT, exc
    assert "connection reset by the peer" in str(exc) or "closed the TCP connection" in str(exc)
    wait_for(lambda: client._loop.connected.is_set() and client._loop.connects == connects + 1, timeout=30)
    assert sum(client.call(svc, "echo", {"n": n}, timeout=10) == {"n": n} for n in range(5)) == 5


def _error_of(fn) -> BaseException | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - returned
        return exc
    return None
