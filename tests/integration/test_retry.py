"""Retries through the broker, dead letters, poison messages, client-side retries."""
import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time

import amqp
import pytest
from kombu import Connection

from amqprpc import CallTimeout, RemoteError, Retry, RpcClient, Service, ServiceUnavailable
from amqprpc import retry as h
from amqprpc.testing import delete_exchanges, delete_queues, running_worker, unique_name, wait_for
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, TopologyMismatch
from amqprpc.server.worker import Worker

pytestmark = pytest.mark.integration

TESTS = os.path.join(os.path.dirname(__file__), "..", "apps")  # the helper apps


@pytest.fixture
def client(broker_url):
    with RpcClient("tests", broker_url=broker_url) as client:
        yield client


def dead_letters(service_name, broker_url):
    """Everything in service.{svc}.dead (consumed: the test owns the queue)."""
    found = []
    with Connection(broker_url) as conn:
        channel = conn.channel()
        while (message := channel.basic_get(DEFAULT_TOPOLOGY.dead_queue_name(service_name), no_ack=True)):
            found.append(message)
    return found


def dead_count(service_name, broker_url):
    """Letters in service.{svc}.dead; 0 before the first one declared it."""
    with Connection(broker_url) as conn:
        try:
            return conn.channel().queue_declare(DEFAULT_TOPOLOGY.dead_queue_name(service_name),
                                                passive=True).message_count
        except amqp.exceptions.NotFound:
            return 0


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_failing_twice_with_connection_error_succeeds_on_attempt_3_for_every_cast(service, client, queue_type):
    attempts = collections.Counter()
    succeeded = {}

    @service.handler("flaky", retry=Retry(max_attempts=3, base_delay=0.05, max_delay=0.2, on=(ConnectionError,)))
    def flaky(payload):
        attempts[payload["n"]] += 1
        if attempts[payload["n"]] < 3:
            raise ConnectionError("database went away")
        succeeded[payload["n"]] = attempts[payload["n"]]

    with running_worker(service, concurrency=4, queue_type=queue_type) as worker:
        for n in range(20):
            client.cast(service.name, "flaky", {"n": n})
        wait_for(lambda: len(succeeded) == 20, timeout=20)
        assert worker.forwarder.stats["retried"] == 40
        assert dead_count(service.name, client.url) == 0
    assert succeeded == {n: 3 for n in range(20)}
    assert all(count == 3 for count in attempts.values())


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_always_failing_is_attempted_exactly_3_times_then_dead_lettered_with_its_reason(service, client, broker_url,
                                                                                       queue_type):
    attempts = collections.Counter()

    @service.handler("doomed", retry=Retry(max_attempts=3, base_delay=0.05, on=ConnectionError))
    def doomed(payload):
        attempts[payload["n"]] += 1
        raise ConnectionError(f"still down for {payload['n']}")

    started = time.time()
    with running_worker(service, queue_type=queue_type):
        for n in range(5):
            client.cast(service.name, "doomed", {"n": n})
        wait_for(lambda: dead_count(service.name, broker_url) == 5, timeout=20)
        letters = dead_letters(service.name, broker_url)
    assert attempts == {n: 3 for n in range(5)}
    for letter in letters:
        headers = letter.properties["application_headers"]
        assert headers[h.ERROR] == f"still down for {json.loads(letter.body)['payload']['n']}"
        assert headers[h.ERROR_TYPE] == "ConnectionError"
        assert headers[h.ATTEMPTS] == 3
        assert started <= headers[h.FIRST_FAILURE] < headers[h.LAST_FAILURE] <= time.time()
        assert headers[h.ORIGINAL_EXCHANGE] == "service.exchange"
        assert headers[h.ORIGINAL_ROUTING_KEY] == f"request.{service.name}"
        assert letter.properties["message_id"]  # the id survives every hop


def test_an_error_not_listed_in_on_is_not_retried(service, client, broker_url):
    attempts = []

    @service.handler("typo", retry=Retry(max_attempts=5, base_delay=0.05, on=(ConnectionError,)))
    def typo(payload):
        attempts.append(1)
        raise KeyError("user_idd")

    with running_worker(service):
        client.cast(service.name, "typo", {})
        wait_for(lambda: dead_count(service.name, broker_url) == 1)
        [letter] = dead_letters(service.name, broker_url)
    assert len(attempts) == 1 and letter.properties["application_headers"][h.ERROR_TYPE] == "KeyError"


def test_short_delays_are_not_held_behind_long_ones(service, client):
    # "slow" retries after 2 s, "quick" after 0.1 s; the slow ones are queued first. With
    # one delay queue and per-message TTLs every quick retry would wait ~2 s behind them.
    done = {}
    failed_once = set()

    def body(payload):
        key = (payload["kind"], payload["n"])
        if key not in failed_once:
            failed_once.add(key)
            raise TimeoutError("try again")
        done[key] = time.monotonic()

    service.handler("slow", retry=Retry(max_attempts=2, base_delay=2.0, jitter=False))(body)
    service.handler("quick", retry=Retry(max_attempts=2, base_delay=0.1, jitter=False))(body)
    with running_worker(service, concurrency=4):
        sent = time.monotonic()
        for n in range(20):
            client.cast(service.name, "slow", {"kind": "slow", "n": n})
        for n in range(20):
            client.cast(service.name, "quick", {"kind": "quick", "n": n})
        wait_for(lambda: len(done) == 40, timeout=30)
    quick = [at for (kind, _), at in done.items() if kind == "quick"]
    slow = [at for (kind, _), at in done.items() if kind == "slow"]
    assert max(quick) < min(slow), "a short retry waited behind a long one"
    assert min(slow) - sent >= 2.0  # and the long ones did wait their delay


def test_call_retries_while_the_deadline_allows_then_gets_the_error_reply(service, client):
    attempts = []

    @service.handler("down", retry=Retry(max_attempts=50, base_delay=0.1, max_delay=0.25, jitter=False))
    def down(payload):
        attempts.append(time.monotonic())
        raise ConnectionError("payment gateway unreachable")

    with running_worker(service):
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:  # not CallTimeout
            client.call(service.name, "down", {}, timeout=1.5)
        answered_after = time.monotonic() - started
    assert info.value.error_type == "ConnectionError"
    assert answered_after < 1.5
    assert 2 <= len(attempts) < 50


def test_call_that_fails_twice_is_answered_by_attempt_3(service, client):
    attempts = []

    @service.handler("flaky", retry=Retry(max_attempts=3, base_delay=0.05, on=(ConnectionError,)))
    def flaky(payload):
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("blip")
        return "ok"

    with running_worker(service):
        assert client.call(service.name, "flaky", {}, timeout=5) == "ok"
    assert len(attempts) == 3


def test_client_retry_reaches_a_service_that_comes_up_late(broker_url, client):
    service = Service(unique_name("late"))
    service.handler("ping")(lambda payload: "pong")
    stop = threading.Event()

    def start_late():
        time.sleep(0.4)
        with running_worker(service, broker_url=broker_url):
            stop.wait(20)

    with pytest.raises(ServiceUnavailable):  # without retry: fails at once
        client.call(service.name, "ping", {}, timeout=5)
    thread = threading.Thread(target=start_late)
    thread.start()
    try:
        assert client.call(service.name, "ping", {}, timeout=10,
                           retry=Retry(max_attempts=20, base_delay=0.05, max_delay=0.3)) == "pong"
    finally:
        stop.set()
        thread.join(20)


def test_client_retry_gives_up_within_one_overall_deadline(client):
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        client.call("no-such-service-anywhere", "x", {}, timeout=1.0,
                    retry=Retry(max_attempts=100, base_delay=0.05, max_delay=0.2))
    assert time.monotonic() - started < 1.5


def test_cast_through_a_connection_loss_is_retried_and_delivered(service, client):
    seen = []
    service.handler("touch")(lambda payload: seen.append(payload["n"]))
    with running_worker(service):
        for n in range(5):
            generation = client._loop.generation
            # Cut our own socket (the shared broker stays up), then publish while the loop reconnects.
            # Waited for: a cast confirmed before the loop got to the cut would prove nothing.
            cut = threading.Event()
            client._loop.call_soon(lambda: (client._loop.connection.connection.transport.sock.shutdown(socket.SHUT_RDWR), cut.set()))
            assert cut.wait(5)
            client.cast(service.name, "touch", {"n": n}, timeout=10)
            assert client._loop.generation > generation
        wait_for(lambda: sorted(set(seen)) == list(range(5)))


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_message_that_kills_the_worker_is_dead_lettered_after_n_redeliveries(service_name, broker_url, queue_type):
    """Real processes: the handler calls os._exit; the worker is restarted like a supervisor would.
    Classic queues count by re-publishing (x-deliveries), quorum queues by x-delivery-count."""
    env = {**os.environ, "AMQPRPC_TEST_SERVICE": service_name, "PYTHONPATH": TESTS}
    command = [sys.executable, "-m", "amqprpc", "worker", service_name, "--app", "retry_app:service",
               "--max-redeliveries", "2", "--concurrency", "1", "--log-level", "warning", "--queue-type", queue_type]
    process = None
    try:
        with RpcClient("tests", broker_url=broker_url) as client:
            exits = []
            for _ in range(6):
                process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if not exits:  # once it consumes, the queue is declared and bound
                    wait_for(lambda: _consumers(DEFAULT_TOPOLOGY.request_queue_format.format(service=service_name),
                                                broker_url), timeout=20)
                    client.cast(service_name, "die", {"n": 1})
                wait_for(lambda: process.poll() is not None or dead_count(service_name, broker_url), timeout=20)
                if process.poll() is None:
                    break  # it survived: the poison is gone
                exits.append(process.returncode)
            # 1 first delivery + 2 counted redeliveries kill it; the 3rd redelivery is dead-lettered unrun
            assert exits == [17, 17, 17]
            wait_for(lambda: dead_count(service_name, broker_url) == 1)
            assert client.call(service_name, "echo", {"still": "alive"}) == {"still": "alive"}
            process.terminate()
            assert process.wait(15) == 0
            [letter] = dead_letters(service_name, broker_url)
            assert letter.properties["application_headers"][h.ERROR_TYPE] == "TooManyRedeliveries"
    finally:
        if process is not None and process.poll() is None:  # a failed assertion must not leave it running
            process.kill()
            process.wait()
        delete_queues(*_all_queues(service_name), broker_url=broker_url)


def _all_queues(service_name):
    request = DEFAULT_TOPOLOGY.request_queue_format.format(service=service_name)
    return [request, *DEFAULT_TOPOLOGY.retry_queue_names(service_name, [request])]


def _consumers(name, broker_url):
    with Connection(broker_url) as conn:
        try:
            return conn.channel().queue_declare(name, passive=True).consumer_count
        except amqp.exceptions.NotFound:
            return 0


def test_quorum_worker_on_an_existing_classic_queue_says_what_to_do(service, broker_url):
    with running_worker(service):
        pass  # leaves nothing: declare the classic queue again below and keep it
    with Connection(broker_url) as conn:
        DEFAULT_TOPOLOGY.request_queue(service.name)(conn.channel()).declare()
    worker = Worker(service, broker_url=broker_url, queue_type="quorum")
    try:
        with pytest.raises(TopologyMismatch, match="drain and delete it first"):
            worker.start()
    finally:
        delete_queues(*_all_queues(service.name), broker_url=broker_url)


def test_retry_policy_is_validated_and_backs_off_exponentially_within_its_cap():
    policy = Retry(max_attempts=4, base_delay=0.5, max_delay=3.0, jitter=False)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = Retry(base_delay=0.5, max_delay=3.0)
    assert all(0 <= jittered.delay(4) <= 3.0 for _ in range(200))
    assert policy.retries(ValueError(), 3) and not policy.retries(ValueError(), 4)
    with pytest.raises(ValueError):
        Retry(max_attempts=0)
    assert DEFAULT_TOPOLOGY.delay_bucket_ms(0.0) == 100
    assert DEFAULT_TOPOLOGY.delay_bucket_ms(0.3) == 500
    assert DEFAULT_TOPOLOGY.delay_bucket_ms(10 ** 6) == 3600000


def test_event_handlers_take_a_retry_policy_too(service):
    policy = Retry(max_attempts=2)

    @service.event("order.*", retry=policy)
    def on_order(payload):
        pass

    assert service.events["on_order"].retry is policy
    service.handler("getUser", retry=policy)(lambda payload: None)
    assert service.retry_policy("getUser") is policy and service.retry_policy("other") is None


def test_failing_event_handler_is_retried_in_its_own_queue_then_dead_lettered(broker_url):
    topology = DEFAULT_TOPOLOGY.namespaced(unique_name("rt"))
    billing, audit = Service(unique_name("billing")), Service(unique_name("audit"))
    attempts, audited = collections.Counter(), []

    @billing.event("invoice.*", retry=Retry(max_attempts=3, base_delay=0.05, on=ConnectionError))
    def charge(payload):
        attempts[payload["n"]] += 1
        if payload["n"] == 0 and attempts[0] < 3:
            raise ConnectionError("bank offline")  # n=0 succeeds on attempt 3
        if payload["n"] == 1:
            raise ConnectionError("bank gone")     # n=1 never does

    audit.event("invoice.*")(lambda payload: audited.append(payload["n"]))
    try:
        with running_worker(billing, topology=topology), running_worker(audit, topology=topology), \
                RpcClient("tests", broker_url=broker_url, topology=topology) as client:
            client.publish_event("invoice.created", {"n": 0})
            client.publish_event("invoice.created", {"n": 1})
            wait_for(lambda: attempts == {0: 3, 1: 3} and len(audited) == 2, timeout=20)
            with Connection(broker_url) as conn:
                dead = topology.dead_queue_name(billing.name)
                wait_for(lambda: conn.channel().queue_declare(dead, passive=True).message_count == 1)
                letter = conn.channel().basic_get(dead, no_ack=True)
        headers = h.headers_of(letter)
        assert (headers[h.ERROR], headers[h.ATTEMPTS]) == ("bank gone", 3)
        assert headers[h.ORIGINAL_QUEUE] == topology.event_queue_format.format(service=billing.name, handler="charge")
        assert headers[h.ORIGINAL_ROUTING_KEY] == "invoice.created"
        assert sorted(audited) == [0, 1]  # retries went to billing's queue only, not to every subscriber
    finally:
        delete_exchanges(topology.service_exchange, topology.event_exchange, broker_url=broker_url)


def test_warm_stop_right_after_failures_leaves_each_retry_exactly_once(service, client, broker_url):
    # The copies in the delay queue are confirmed and the originals acked before the
    # connection closes: nothing comes back as a duplicate, nothing is lost.
    service.handler("later", retry=Retry(max_attempts=2, base_delay=30.0, jitter=False))(
        lambda payload: (_ for _ in ()).throw(ConnectionError("not now")))
    request = DEFAULT_TOPOLOGY.request_queue_format.format(service=service.name)
    delay = DEFAULT_TOPOLOGY.delay_queue(request, DEFAULT_TOPOLOGY.delay_bucket_ms(30.0)).name
    with running_worker(service, concurrency=4, delete=False) as worker:
        for n in range(50):
            client.cast(service.name, "later", {"n": n})
        wait_for(lambda: worker.stats["failed"] == 50)
    try:
        with Connection(broker_url) as conn:
            channel = conn.channel()
            assert channel.queue_declare(request, passive=True).message_count == 0
            assert channel.queue_declare(delay, passive=True).message_count == 50
    finally:
        delete_queues(*_all_queues(service.name), broker_url=broker_url)
