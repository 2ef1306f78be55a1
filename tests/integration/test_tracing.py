"""Deadlines and traces across hops: A -> B -> C in three worker processes, and casts and
events sent from inside a handler."""
import signal
import time

import pytest
from conftest import log_lines, wait_ready
from kombu import Connection, Exchange, Queue

from amqprpc import CallTimeout, RpcClient, Service
from amqprpc.wire import envelope
from amqprpc.context import current
from amqprpc.testing import delete_queues, running_worker, unique_name, wait_for

pytestmark = pytest.mark.integration

CHAIN = """
import os, time
from amqprpc import RpcClient, Service, logs

log = logs.get_logger("chain")
a, b, c = (Service(os.environ["CHAIN_" + hop]) for hop in "ABC")


@a.handler
def start(payload):
    log.info("a working")
    with RpcClient("a") as client:
        return client.call(b.name, "relay", payload, timeout=30)  # bounded by the incoming deadline


@b.handler
def relay(payload):
    log.info("b working")
    with RpcClient("b") as client:
        return client.call(c.name, "work", payload, timeout=30)


@c.handler
def work(payload):
    log.info("c working", sleep=payload["sleep"])
    time.sleep(payload["sleep"])
    return "done"
"""


def test_a_chain_with_a_1s_deadline_drops_the_late_request_and_shares_one_trace(
        tmp_path, broker_url, worker_processes):
    names = {hop: unique_name(f"chain{hop.lower()}") for hop in "ABC"}
    module = f"chain_{names['A'].replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(CHAIN)
    env = {f"CHAIN_{hop}": name for hop, name in names.items()}
    workers = {hop: worker_processes(names[hop], "--app", f"{module}:{hop.lower()}", "--concurrency", "1",
                                     "--prefetch", "2", "--registry-interval", "0", "--log-level", "debug", env=env)
               for hop in "ABC"}
    try:
        wait_ready(*workers.values())
        with RpcClient("tests", broker_url=broker_url) as client:
            # C is slow: busy with earlier work (a cast: no deadline) when the chain's request arrives.
            client.cast(names["C"], "work", {"sleep": 2.0})
            wait_for(lambda: any(line["event"] == "c working" for line in log_lines(workers["C"])), timeout=10)
            started = time.monotonic()
            with pytest.raises(CallTimeout):
                client.call(names["A"], "start", {"sleep": 0}, timeout=1.0)
            elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 1.5, elapsed  # the deadline, plus scheduling slack on a busy machine

        def dropped():
            return [line for line in log_lines(workers["C"]) if line["event"] == "request expired, dropped unrun"]

        (expired,) = wait_for(dropped, timeout=10)
    finally:
        for process in workers.values():  # stop them first: a worker re-declares a deleted queue
            process.send_signal(signal.SIGTERM)
        for process in workers.values():
            process.wait(20)
        delete_queues(*(f"service.{name}.request" for name in names.values()))
    lines = {hop: log_lines(process) for hop, process in workers.items()}
    (a_line,) = [line for line in lines["A"] if line["event"] == "a working"]
    (b_line,) = [line for line in lines["B"] if line["event"] == "b working"]
    trace = a_line["trace_id"]
    assert b_line["trace_id"] == expired["trace_id"] == trace
    # parent call ids link the hops: A's request -> B's -> C's
    assert b_line["parent_id"] == a_line["correlation_id"]
    assert expired["parent_id"] == b_line["correlation_id"]
    assert expired["service"] == names["C"] and expired["action"] == "work"
    # C ran only the cast, never the chain's request
    assert [line.get("sleep") for line in lines["C"] if line["event"] == "c working"] == [2.0]
    # every line a hop logged about a request of this call carries the trace id
    for hop, action in (("A", "start"), ("B", "relay"), ("C", "work")):
        about = [line for line in lines[hop] if line.get("action") == action and line.get("trace_id") == trace]
        assert about, hop
        strays = [line for line in lines[hop] if line.get("action") == action and "trace_id" not in line]
        assert not strays, strays
    # B's nested call timed out at the deadline too, and said so on a line with the trace
    assert any(line["event"] == "handler failed" and line["error_type"] == "CallTimeout"
               and line["trace_id"] == trace for line in lines["B"])


def test_casts_and_events_from_a_handler_carry_the_trace_and_parent(broker_url, service):
    receiver = Service(unique_name("receiver"))
    event_name = f"{unique_name('traced')}.happened"
    seen = {}

    @receiver.handler
    def touch(payload):
        seen["cast"] = current.get()

    @receiver.event(event_name)
    def on_happened(payload):
        seen["event"] = current.get()

    @service.handler
    def fan_out(payload):
        seen["origin"] = current.get()
        with RpcClient("fan-out", broker_url=broker_url) as nested:
            nested.cast(receiver.name, "touch", {})
            nested.publish_event(event_name, {})
        return "ok"

    events = Queue(unique_name("events"), Exchange("event.exchange", type="topic", durable=True),
                   routing_key=event_name, exclusive=True)
    with Connection(broker_url) as conn, running_worker(receiver), running_worker(service):
        bound = events(conn.default_channel)
        bound.declare()
        with RpcClient("tests", broker_url=broker_url) as client:
            assert client.call(service.name, "fan_out", {}) == "ok"
        wait_for(lambda: "cast" in seen and "event" in seen)
        message = wait_for(lambda: bound.get(no_ack=True))
    headers = envelope.loads(message.body)["headers"]
    origin = seen["origin"]
    assert seen["cast"].trace_id == seen["event"].trace_id == origin.trace_id == headers["trace_id"]
    assert headers["parent_id"] == origin.correlation_id


def test_a_timeout_further_down_the_chain_is_a_timeout_to_the_caller(broker_url, service):
    @service.handler
    def relay(payload):
        raise CallTimeout("downstream.work: no answer within 0.5s")

    with running_worker(service), RpcClient("tests", broker_url=broker_url) as client:
        with pytest.raises(CallTimeout, match="downstream.work"):
            client.call(service.name, "relay", {})
