"""Deadlines that survive clocks that disagree (#26): a call carries the time it has left
(``timeout_ms``) beside its absolute deadline, and the worker counts it from the message's
arrival on its own clock. Peers that send the absolute deadline alone (the seed's PHP
services) are still compared with the worker's clock, as before."""
from __future__ import annotations

import time

import pytest

from amqprpc import CallTimeout, RpcClient
from amqprpc.testing import delete_queues, unique_name
from amqprpc.wire import envelope
from workerproc import WorkerProcess

SKEW = 30.0  # seconds: the figure


def request(headers: dict, properties: dict | None = None) -> envelope.Request:
    body = envelope.request_body(message_id="m1", source="a", target="b", action="x", payload={},
                                 reply_to="r", headers=headers)
    return envelope.decode_request(body, {"content_type": "application/json", **(properties or {})})


def test_the_deadline_counts_the_time_left_from_arrival_on_this_hosts_clock():
    arrived = time.time()
    req = request({"deadline": arrived - SKEW, "timeout_ms": 5000}, {envelope.ARRIVED_PROPERTY: arrived})
    assert req.deadline == pytest.approx(arrived + 5.0)


def test_a_peer_that_sends_only_the_absolute_deadline_is_read_as_before():
    assert request({"deadline": 1234.5}).deadline == 1234.5
    assert request({}).deadline is None
    for bad in ("5000", True, float("inf"), 10 ** 400, None):  # not a number: as if absent
        assert envelope.Request(*[None] * 7, {"deadline": 99.0, "timeout_ms": bad}).deadline == 99.0


def test_a_parked_retry_counts_what_was_left_when_it_was_parked_not_the_original_time():
    arrived = time.time()
    req = request({"deadline": arrived + 60, "timeout_ms": 60000},
                  {envelope.ARRIVED_PROPERTY: arrived, "application_headers": {envelope.REMAINING_MS_HEADER: 1500}})
    assert req.deadline == pytest.approx(arrived + 1.5)


def test_the_client_sends_both_and_a_nested_call_sends_what_is_left():
    from amqprpc import context

    client = RpcClient.__new__(RpcClient)  # _deadline reads only the default timeout and the call context
    client.timeout = 10.0
    timeout, headers = client._deadline(3.0)
    assert headers["timeout_ms"] == 3000 and headers["deadline"] == pytest.approx(time.time() + 3, abs=0.1)
    outer = context.CallContext("svc", "relay", "c1", "t1", time.time() + 1.0)  # the handler has 1 s left
    token = context.current.set(outer)
    try:
        timeout, headers = client._deadline(30.0)
    finally:
        context.current.reset(token)
    assert 900 <= headers["timeout_ms"] <= 1000 and headers["deadline"] == pytest.approx(outer.deadline)


@pytest.fixture
def svc(broker_url):
    name = unique_name("skew")
    yield name
    delete_queues(f"service.{name}.request", f"service.{name}.dead")


@pytest.mark.integration
@pytest.mark.parametrize("skew", [SKEW, -SKEW], ids=["worker-30s-ahead", "worker-30s-behind"])
def test_a_worker_whose_clock_is_30s_off_still_serves_calls_and_their_deadlines_hold(svc, tmp_path, skew):
    worker = WorkerProcess(svc, str(tmp_path / "w.log"), "--concurrency", "1", "--prefetch", "10",
                           app="skewed_clock_app:service", env={"AMQPRPC_TEST_CLOCK_SKEW": str(skew)})
    try:
        worker.wait_event("worker ready")
        with RpcClient("skew-test", timeout=5) as client:
            answers = [client.call(svc, "echo", {"n": n}, timeout=5) for n in range(20)]
            assert [a["echo"] for a in answers] == [{"n": n} for n in range(20)]
            # The worker sees (almost) the whole 5 s left, whatever its clock says.
            assert all(4.0 < a["remaining"] <= 5.0 for a in answers), answers
            # And a deadline still holds on the skewed host: a call that waits behind a
            # slow one among the prefetched past its 0.2 s is dropped unrun.
            client.call_async(svc, "block", {"sleep": 0.6}, timeout=5)
            time.sleep(0.05)
            with pytest.raises(CallTimeout):
                client.call(svc, "echo", {"n": "late"}, timeout=0.2)
            worker.wait_event("request expired, dropped unrun", timeout=5)
            assert client.call(svc, "echo", {"n": "after"}, timeout=5)["echo"] == {"n": "after"}
    finally:
        worker.process.kill()
        worker.process.wait(10)
