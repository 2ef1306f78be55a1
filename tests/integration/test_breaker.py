"""The circuit breaker: its state machine (process-local and in Redis), and callers that
fail fast against a real service that is down."""
import concurrent.futures
import json
import subprocess
import sys
import time

import pytest
import redis
from kombu import Connection

from amqprpc import CallTimeout, CircuitBreaker, CircuitOpen, RemoteError, RpcClient, Service, ServiceUnavailable
from amqprpc.client.breaker import CLOSED, HALF_OPEN, OPEN
from amqprpc.config import redis_url
from amqprpc.testing import capture_logs, running_worker, unique_name, wait_for
from amqprpc.wire.topology import DEFAULT_TOPOLOGY

REDIS_URL = redis_url()


@pytest.fixture
def prefix(redis_available):
    """A Redis key prefix of this test alone; its keys are deleted after."""
    name = unique_name("t6:breaker")
    yield name
    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(match=f"{name}:*"):
        r.delete(key)


def fail(breaker, service="svc", action="a", exc=None):
    ticket = breaker.before_call(service, action)
    breaker.record(ticket, exc or CallTimeout("x"))


def succeed(breaker, service="svc", action="a"):
    breaker.record(breaker.before_call(service, action), None)


def rejects(breaker, service="svc", action="a"):
    try:
        ticket = breaker.before_call(service, action)
    except CircuitOpen:
        return True
    breaker.record(ticket, None)
    return False


# --- the state machine, process-local --------------------------------------------------
def test_consecutive_failures_open_it_and_a_success_resets_the_count():
    breaker = CircuitBreaker(failure_threshold=3, shared=False)
    fail(breaker), fail(breaker), succeed(breaker), fail(breaker), fail(breaker)
    assert breaker.state("svc") == CLOSED
    fail(breaker)
    assert breaker.state("svc") == OPEN
    with pytest.raises(CircuitOpen, match="nothing was sent"):
        breaker.before_call("svc", "a")
    assert breaker.stats["rejected"] == 1


def test_state_changes_and_rejections_are_counted_in_prometheus_metrics():
    from prometheus_client import REGISTRY

    from amqprpc.middleware import metrics

    metrics.count_breakers()  # what --metrics-port (and ClientMetrics) switch on

    name = unique_name("metered")
    breaker = CircuitBreaker(failure_threshold=2, shared=False)

    def sample(metric, **labels):
        return REGISTRY.get_sample_value(metric, {"breaker": name, **labels}) or 0.0

    fail(breaker, name), fail(breaker, name)
    assert rejects(breaker, name) and rejects(breaker, name)
    assert sample("amqprpc_breaker_state") == 2  # open
    assert sample("amqprpc_breaker_transitions_total", old=CLOSED, new=OPEN, origin="local") == 1
    assert sample("amqprpc_breaker_rejections_total") == 2


def test_half_open_allows_bounded_trials_then_success_closes_and_failure_reopens():
    changes = []
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.2, half_open_max_calls=2, shared=False,
                             listeners=[changes.append])
    fail(breaker)
    with pytest.raises(CircuitOpen):
        breaker.before_call("svc", "a")
    time.sleep(0.25)
    first, second = breaker.before_call("svc", "a"), breaker.before_call("svc", "a")
    assert first.trial and second.trial
    with pytest.raises(CircuitOpen):  # only two trials at a time
        breaker.before_call("svc", "a")
    breaker.record(first, CallTimeout("still down"))
    assert breaker.state("svc") == OPEN
    time.sleep(0.25)
    breaker.record(breaker.before_call("svc", "a"), None)
    assert breaker.state("svc") == CLOSED
    assert [(c.old, c.new) for c in changes] == [
        (CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_what_counts_as_a_failure():
    breaker = CircuitBreaker(shared=False)
    assert breaker.is_failure(CallTimeout()) and breaker.is_failure(ServiceUnavailable())
    assert breaker.is_failure(ConnectionResetError())
    assert not breaker.is_failure(RemoteError("bad input", "ValueError"))
    assert not breaker.is_failure(CircuitOpen())
    assert CircuitBreaker(count_remote_errors=True, shared=False).is_failure(RemoteError("x"))
    strict = CircuitBreaker(failure_threshold=2, shared=False)
    for _ in range(5):
        fail(strict, exc=RemoteError("business rule", "ValueError"))
    assert strict.state("svc") == CLOSED


def test_per_action_breakers_are_independent():
    breaker = CircuitBreaker(failure_threshold=1, per_action=True, shared=False)
    fail(breaker, action="slow")
    with pytest.raises(CircuitOpen):
        breaker.before_call("svc", "slow")
    breaker.before_call("svc", "fast")


def test_failure_rate_window_opens_it_without_consecutive_failures():
    breaker = CircuitBreaker(failure_threshold=100, failure_rate=0.5, window=10, min_calls=10, shared=False)
    for i in range(9):
        (fail if i % 2 else succeed)(breaker)
    assert breaker.state("svc") == CLOSED  # 4 of 9 failed, and fewer than min_calls
    fail(breaker)
    assert breaker.state("svc") == OPEN


def test_a_broken_listener_does_not_break_calls():
    breaker = CircuitBreaker(failure_threshold=1, shared=False)
    breaker.add_listener(lambda change: 1 / 0)
    fail(breaker)
    assert breaker.state("svc") == OPEN


def test_fallback_answers_instead_of_circuit_open_and_of_counted_failures():
    seen = []

    def fallback(service, action, payload, exc):
        seen.append(type(exc).__name__)
        return {"degraded": True}

    breaker = CircuitBreaker(failure_threshold=1, fallback=fallback, shared=False)

    def down():
        raise CallTimeout("down")

    assert breaker.call("svc", "a", {}, down) == {"degraded": True}
    assert breaker.call("svc", "a", {}, lambda: "never runs") == {"degraded": True}
    assert seen == ["CallTimeout", "CircuitOpen"]


# --- shared through Redis --------------------------------------------------------------
@pytest.mark.integration
def test_processes_share_the_state_through_redis(prefix):
    one, other = (CircuitBreaker(failure_threshold=3, reset_timeout=1.0, key_prefix=prefix, redis_url=REDIS_URL,
                                 sync_interval=0.2) for _ in range(2))
    assert one.shared and other.shared
    fail(one), fail(other), fail(one)  # consecutive across "processes"
    # "other" trusts its cached "closed" for sync_interval, then sees the trip
    wait_for(lambda: rejects(other), timeout=0.5)
    time.sleep(1.05)
    trial = other.before_call("svc", "a")
    assert trial.trial
    with pytest.raises(CircuitOpen):  # the one trial slot is taken, by the other process
        one.before_call("svc", "a")
    other.record(trial, None)
    assert one.state("svc") == CLOSED


@pytest.mark.integration
def test_concurrent_failures_are_counted_atomically(prefix):
    breakers = [CircuitBreaker(failure_threshold=1000, key_prefix=prefix, redis_url=REDIS_URL) for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: fail(breakers[i % 4]), range(200)))
    stored = redis.Redis.from_url(REDIS_URL).hget(f"{prefix}:svc", "failures")
    assert int(stored) == 200


@pytest.mark.integration
def test_a_closed_breaker_does_not_ask_redis_on_every_successful_call(prefix):
    breaker = CircuitBreaker(key_prefix=prefix, redis_url=REDIS_URL, sync_interval=60)
    calls = []
    original = breaker._store._run
    breaker._store._run = lambda *args: calls.append(args[1]) or original(*args)
    for _ in range(100):
        succeed(breaker)
    assert len(calls) == 1  # the first look; then the cached view for sync_interval


# --- against the real broker -----------------------------------------------------------
def queue_message_count(broker_url, name):
    with Connection(broker_url) as conn:
        return conn.default_channel.queue_declare(name, passive=True).message_count


@pytest.fixture
def consumerless_service(broker_url):
    """A service whose request queue exists but that nobody consumes."""
    name = unique_name("down")
    queue = DEFAULT_TOPOLOGY.request_queue(name)
    with Connection(broker_url) as conn:
        queue(conn.default_channel).declare()
    yield name
    with Connection(broker_url) as conn:
        conn.default_channel.queue_delete(queue.name)


@pytest.mark.integration
def test_a_dead_service_opens_the_breaker_then_calls_fail_fast_unsent_then_it_closes_again(
        broker_url, prefix, consumerless_service):
    service = consumerless_service
    queue = DEFAULT_TOPOLOGY.request_queue_format.format(service=service)
    changes = []
    reset_timeout = 3.0  # long enough for the checks below to run while it is open, even on a busy machine
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=reset_timeout, key_prefix=prefix,
                             redis_url=REDIS_URL, listeners=[changes.append])
    with RpcClient("tests", broker_url=broker_url, breaker=breaker) as client:
        for _ in range(3):
            with pytest.raises(CallTimeout):
                client.call(service, "echo", {}, timeout=0.2)
        opened = time.monotonic()
        assert breaker.state(service) == OPEN
        # The timed-out requests expire in the queue (per-message TTL = the call's timeout).
        wait_for(lambda: queue_message_count(broker_url, queue) == 0, timeout=10)
        durations = []
        for _ in range(20):
            started = time.perf_counter()
            with pytest.raises(CircuitOpen):
                client.call(service, "echo", {}, timeout=30)
            durations.append(time.perf_counter() - started)
        assert sorted(durations)[10] < 0.005, durations  # the bound; typically ~10 us
        time.sleep(0.3)  # a published request (30 s TTL) would be in the queue by now
        assert queue_message_count(broker_url, queue) == 0
        assert breaker.stats["rejected"] == 20

        assert time.monotonic() - opened < reset_timeout, "too slow: the checks above ran after the reset"
        service_back = Service(service)
        service_back.handler("echo")(lambda payload: payload)
        with running_worker(service_back, broker_url=broker_url, delete=False):
            time.sleep(max(0.0, opened + reset_timeout + 0.05 - time.monotonic()))
            assert client.call(service, "echo", {"n": 1}, timeout=5) == {"n": 1}  # the half-open trial
            assert breaker.state(service) == CLOSED
            assert client.call(service, "echo", {"n": 2}, timeout=5) == {"n": 2}
    assert [(c.old, c.new) for c in changes] == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


@pytest.mark.integration
def test_call_async_is_guarded_too_and_records_off_the_io_thread(broker_url):
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=60, shared=False)
    missing = unique_name("nobody")
    with RpcClient("tests", broker_url=broker_url, breaker=breaker) as client:
        for _ in range(2):
            with pytest.raises(ServiceUnavailable):
                client.call_async(missing, "echo", {}).result(5)
        wait_for(lambda: breaker.state(missing) == OPEN)  # recorded by the callback thread
        refused = client.call_async(missing, "echo", {})
        assert isinstance(refused.exception(0), CircuitOpen)


_SECOND_PROCESS = """
import json, sys, time
from amqprpc import CircuitBreaker, CircuitOpen, RpcClient
service, prefix, redis_url, broker_url = sys.argv[1:5]
breaker = CircuitBreaker(failure_threshold=3, reset_timeout=60, key_prefix=prefix, redis_url=redis_url)
with RpcClient("second", broker_url=broker_url, breaker=breaker) as client:
    started = time.perf_counter()
    try:
        client.call(service, "echo", {}, timeout=30)
        outcome = "sent"
    except CircuitOpen:
        outcome = "CircuitOpen"
    print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - started, "stats": breaker.stats}))
"""


@pytest.mark.integration
def test_a_second_process_sees_the_open_breaker_through_redis(broker_url, prefix, consumerless_service):
    service = consumerless_service
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=60, key_prefix=prefix, redis_url=REDIS_URL)
    with RpcClient("tests", broker_url=broker_url, breaker=breaker) as client:
        for _ in range(3):
            with pytest.raises(CallTimeout):
                client.call(service, "echo", {}, timeout=0.2)
    assert breaker.state(service) == OPEN
    result = subprocess.run([sys.executable, "-c", _SECOND_PROCESS, service, prefix, REDIS_URL, broker_url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout  # the script's own line: amqprpc prints nothing
    report = json.loads(result.stdout)
    assert report["outcome"] == "CircuitOpen"
    assert report["stats"]["rejected"] == 1 and report["stats"]["opened"] == 1  # it saw "open", made no call
    queue = DEFAULT_TOPOLOGY.request_queue_format.format(service=service)
    wait_for(lambda: queue_message_count(broker_url, queue) == 0, timeout=10)  # only the 3 expiring ones were sent


@pytest.mark.integration
def test_with_redis_stopped_calls_still_work_on_local_state(broker_url, service, redis_server):
    url, redis_proc = redis_server()
    service.handler("echo")(lambda payload: payload)
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=60, redis_url=url, key_prefix="t6", sync_interval=0)
    with running_worker(service, broker_url=broker_url), \
            RpcClient("tests", broker_url=broker_url, breaker=breaker) as client:
        assert client.call(service.name, "echo", {"n": 0}) == {"n": 0}
        redis_proc.terminate()
        redis_proc.wait(10)
        with capture_logs() as logged:
            for n in range(1, 30):
                assert client.call(service.name, "echo", {"n": n}) == {"n": n}
            # ... and the breaker still works, on this process's own state
            missing = unique_name("nobody")
            for _ in range(2):
                with pytest.raises(ServiceUnavailable):
                    client.call(missing, "echo", {}, timeout=5)
            with pytest.raises(CircuitOpen):
                client.call(missing, "echo", {}, timeout=5)
    warnings = [line for line in logged if line["log_level"] == "warning" and "redis" in line["event"]]
    assert len(warnings) == 1, logged
    assert "circuit opened" in [line["event"] for line in logged]


@pytest.mark.integration
def test_a_services_breaker_guards_the_calls_its_handlers_make(broker_url, service):
    """Service(breaker=...) reaches service.client: a dead downstream service fails the
    handler's nested calls fast (CircuitOpen) once the threshold is reached."""
    service.breaker = CircuitBreaker(failure_threshold=2, reset_timeout=60.0, shared=False)
    downstream = unique_name("gone")

    @service.handler
    def relay(payload):
        return service.client.call(downstream, "anything", {}, timeout=2)

    error_types = []
    with running_worker(service), RpcClient("tests", broker_url=broker_url) as client:
        for _ in range(4):
            with pytest.raises(RemoteError) as info:
                client.call(service.name, "relay", {})
            error_types.append(info.value.error_type)
    assert error_types == ["ServiceUnavailable", "ServiceUnavailable", "CircuitOpen", "CircuitOpen"]


def test_importing_the_metrics_module_wires_nothing_by_itself():
    """Explicit wiring (#21): a breaker reports to Prometheus once metrics are switched on
    (count_breakers, which --metrics-port and ClientMetrics call), never as an import side effect."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", "from amqprpc.client import breaker\n"
                    "from amqprpc.middleware import metrics\n"
                    "assert breaker.change_listeners == [] and breaker.rejection_listeners == [], breaker.change_listeners\n"
                    "metrics.count_breakers(); metrics.count_breakers()\n"
                    "assert breaker.change_listeners == [metrics.breaker_changed]\n"], check=True, timeout=60)
