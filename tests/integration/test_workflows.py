"""Workflows (#24): chain, group and chord across services, what follows a step riding in
its message, a chord's callback run exactly once. The in-memory tests run the worker's own
dispatcher (and the real Redis); the broker tests run real workers, two per service."""
from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import time
from typing_extensions import TypedDict

import pytest
import redis
from click.testing import CliRunner

from amqprpc import AsyncRpcClient, RpcClient, Service, cli, WorkflowFailed, chain, chord, context, group, task
from amqprpc.config import redis_url
from amqprpc.errors import ContractError
from amqprpc.testing import InMemoryClient, running_worker, unique_name, wait_for
from amqprpc.workflow import WorkflowState

pytestmark = pytest.mark.integration  # Redis holds every workflow's state


@pytest.fixture
def prefix(monkeypatch):
    """Workflow keys of this test alone, deleted after it."""
    prefix = unique_name("wf-test") + ":"
    monkeypatch.setenv("AMQPRPC_WORKFLOW_PREFIX", prefix)
    from amqprpc import workflow

    workflow._states.clear()
    yield prefix
    client = redis.Redis.from_url(redis_url())
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    workflow._states.clear()


def _maths(name: str) -> Service:
    service = Service(name)
    service.handler("add")(lambda payload: payload["a"] + payload["b"])
    service.handler("double")(lambda payload: payload["result"] * 2)
    service.handler("total")(lambda payload: sum(payload["result"]))
    service.handler("square")(lambda payload: payload["n"] ** 2)

    @service.handler
    def explode(payload):
        raise ValueError("no good")

    return service


def _text(name: str) -> Service:
    service = Service(name)
    service.handler("describe")(lambda payload: f"the answer is {payload['result']}")
    return service


def test_a_chain_over_two_services_passes_each_result_on(prefix):
    client = InMemoryClient(_maths("maths"), _text("text"))
    handle = client.run(chain(task("maths", "add", {"a": 2, "b": 3}), task("maths", "double"),
                              task("text", "describe")))
    assert handle.result(timeout=5) == "the answer is 10"
    status = handle.status()
    assert status["state"] == "succeeded"
    assert [(step["action"], step["state"]) for step in status["steps"].values()] == [
        ("add", "succeeded"), ("double", "succeeded"), ("describe", "succeeded")]


def test_a_step_given_a_payload_keeps_it_and_a_group_returns_its_results_in_order(prefix):
    client = InMemoryClient(_maths("maths"))
    squares = group(*(task("maths", "square", {"n": n}) for n in range(6)))
    assert client.run(squares).result(timeout=5) == [0, 1, 4, 9, 16, 25]
    # The chord's callback gets the list; a step with its own payload ignores the result before it.
    assert client.run(chord(squares, task("maths", "total"))).result(timeout=5) == 55
    assert client.run(chain(task("maths", "square", {"n": 5}), task("maths", "add", {"a": 1, "b": 1}))).result(5) == 2


def test_chains_of_groups_and_groups_of_chains_nest(prefix):
    client = InMemoryClient(_maths("maths"))
    pairs = group(*(chain(task("maths", "square", {"n": n}), task("maths", "double")) for n in (1, 2, 3)))
    assert client.run(chain(pairs, task("maths", "total"), task("maths", "double"))).result(timeout=5) == 56


def test_a_failing_step_fails_the_workflow_and_what_follows_never_runs(prefix):
    maths = _maths("maths")
    ran = []
    maths.handler("record")(lambda payload: ran.append(payload))
    client = InMemoryClient(maths)
    handle = client.run(chord(group(task("maths", "square", {"n": 2}), task("maths", "explode")),
                              task("maths", "record")))
    with pytest.raises(WorkflowFailed) as failed:
        handle.result(timeout=5)
    assert (failed.value.step, failed.value.action, failed.value.error_type) == ("0.0.1", "explode", "ValueError")
    assert failed.value.results == {"0.0.0": 4}
    assert ran == [] and [letter.action for letter in client.dead_letters] == ["explode"]


class Order(TypedDict):
    order_id: str
    total: float


class Receipt(TypedDict):
    text: str


def test_typed_steps_that_cannot_feed_each_other_are_refused_when_built():
    service = Service("typed")

    @service.handler
    def count(payload: dict) -> int:
        return 1

    @service.handler
    def receipt(payload: Order) -> Receipt:
        return {"text": f"{payload['order_id']}: {payload['total']}"}

    @service.handler
    def price(payload: dict) -> Order:
        return {"order_id": "o1", "total": 9.5}

    chain(task(service, "price"), task(service, "receipt"), task(service, "count"))  # each feeds the next
    with pytest.raises(ContractError, match="typed.receipt returns Receipt"):
        chain(task(service, "receipt"), task(service, "receipt"))
    with pytest.raises(ContractError, match="typed.count returns int"):
        chain(task(service, "count"), task(service, "receipt"))
    chain(task(service, "count"), task(service, "receipt", {"order_id": "o2", "total": 1.0}))  # its own payload


def test_a_revoked_workflow_stops_before_its_next_step(prefix):
    maths = _maths("maths")
    client = InMemoryClient(maths)
    state = WorkflowState(redis.Redis.from_url(redis_url()), prefix=prefix)
    handle = client.run(task("maths", "square", {"n": 3}))
    assert handle.result(timeout=5) == 9 and not handle.revoke()  # ended already
    # A workflow revoked while its first step waits: the step is acked unrun.
    from amqprpc.workflow import start

    class Holding:  # a client that keeps the first step's cast instead of sending it
        def __init__(self):
            self.held = []

        def cast(self, *args, **kwargs):
            self.held.append((args, dict(context.outgoing_headers.get())))

    holder = Holding()
    handle = start(holder, task("maths", "square", {"n": 4}), state)
    assert handle.revoke()
    (service, action, payload), headers = holder.held[0]
    token = context.outgoing_headers.set(headers)  # now it arrives, after the revoke
    try:
        client.cast(service, action, payload)
    finally:
        context.outgoing_headers.reset(token)
    with pytest.raises(WorkflowFailed, match="Revoked"):
        handle.result(timeout=1)
    assert handle.status()["steps"]["0"]["state"] == "queued"


def test_a_thousand_chords_leave_no_key_behind_after_their_ttl(prefix, monkeypatch):
    monkeypatch.setenv("AMQPRPC_WORKFLOW_TTL", "2")
    client = InMemoryClient(_maths("maths"))
    handles = [client.run(chord(group(*(task("maths", "square", {"n": n}) for n in range(9))),
                                task("maths", "total"))) for _ in range(1000)]
    assert {handle.result(timeout=5) for handle in handles[-3:]} == {204}
    keys = redis.Redis.from_url(redis_url())
    assert any(True for _ in keys.scan_iter(f"{prefix}*", count=1000))
    wait_for(lambda: not any(True for _ in keys.scan_iter(f"{prefix}*", count=1000)), timeout=10)


# --- against the real broker, two workers per service --------------------------------------
CHORD_APP = textwrap.dedent('''
    import os, time
    import redis
    from amqprpc import Service

    COUNTS = redis.Redis.from_url(os.environ["AMQPRPC_REDIS_URL"])
    service = Service(os.environ["WF_SERVICE"])

    @service.handler
    def slow_square(payload):
        time.sleep(payload.get("sleep", 0.05))
        COUNTS.hincrby(os.environ["WF_COUNTS"], "header", 1)
        return payload["n"] ** 2

    @service.handler
    def collect(payload):
        COUNTS.hincrby(os.environ["WF_COUNTS"], "callback", 1)
        COUNTS.hset(os.environ["WF_COUNTS"], "results", len(payload["result"]))
        return sum(payload["result"])
''')


def test_a_chain_and_a_group_of_fifty_through_real_workers(broker_url, prefix):
    maths, text = _maths(unique_name("maths")), _text(unique_name("text"))
    with running_worker(maths, broker_url=broker_url) as m1, running_worker(maths, broker_url=broker_url,
                                                                             delete=False) as m2, \
            running_worker(text, broker_url=broker_url) as t1, running_worker(text, broker_url=broker_url,
                                                                           delete=False) as t2:
        with RpcClient(broker_url=broker_url, source="wf-test") as client:
            handle = client.run(chain(task(maths.name, "add", {"a": 20, "b": 1}), task(maths.name, "double"),
                                      task(text.name, "describe")))
            assert handle.result(timeout=20) == "the answer is 42"
            fifty = client.run(group(*(task(maths.name, "square", {"n": n}) for n in range(50))))
            assert fifty.result(timeout=30) == [n * n for n in range(50)]
            failing = client.run(chain(task(maths.name, "add", {"a": 1, "b": 1}), task(maths.name, "explode"),
                                       task(text.name, "describe")))
            with pytest.raises(WorkflowFailed) as failed:
                failing.result(timeout=20)
            assert failed.value.action == "explode" and failed.value.results == {"0.0": 2}
            assert failing.status()["steps"]["0.2"]["state"] == "queued"  # never ran
            workers = (m1, m2, t1, t2)
            assert sum(worker.stats.get("workflows_succeeded", 0) for worker in workers) == 2
            assert sum(worker.stats.get("workflows_failed", 0) for worker in workers) == 1
            assert sum(worker.stats["received"] for worker in (t1, t2)) == 1
        result = CliRunner().invoke(cli.main, ["workflow", "show", failing.id])
        assert result.exit_code == 0, result.output
        assert f"workflow {failing.id}: failed" in result.output and "failed at 0.1: ValueError: no good" in result.output


def test_an_async_client_runs_a_workflow_and_awaits_its_result(broker_url, prefix):
    maths = _maths(unique_name("maths"))

    async def scenario():
        async with AsyncRpcClient(broker_url=broker_url, source="wf-async") as client:
            handle = await client.run(group(task(maths.name, "square", {"n": 3}), task(maths.name, "square", {"n": 4})))
            return await handle.result(timeout=20), (await handle.status())["state"]

    with running_worker(maths, broker_url=broker_url):
        assert asyncio.run(scenario()) == ([9, 16], "succeeded")


def test_a_chords_callback_runs_once_with_every_result_when_a_worker_is_killed_mid_way(
        broker_url, prefix, tmp_path, worker_processes):
    (tmp_path / "chord_app.py").write_text(CHORD_APP)
    name, counts = unique_name("chord"), unique_name("wf-counts")
    env = {"WF_SERVICE": name, "WF_COUNTS": counts, "AMQPRPC_REDIS_URL": redis_url(),
           "AMQPRPC_WORKFLOW_PREFIX": prefix}
    from conftest import wait_ready

    workers = [worker_processes(name, "--app", "chord_app:service", "--concurrency", "2", env=env) for _ in range(2)]
    wait_ready(*workers)
    store = redis.Redis.from_url(redis_url(), decode_responses=True)
    try:
        with RpcClient(broker_url=broker_url, source="wf-test") as client:
            handle = client.run(chord(group(*(task(name, "slow_square", {"n": n, "sleep": 0.3}) for n in range(20))),
                                      task(name, "collect")))
            wait_for(lambda: int(store.hget(counts, "header") or 0) >= 4, timeout=20)
            os.kill(workers[0].pid, signal.SIGKILL)  # mid-way: it holds unacked steps
            assert handle.result(timeout=60) == sum(n * n for n in range(20))
            time.sleep(1.0)  # a second callback, were there one, would have run by now
            assert store.hget(counts, "callback") == "1" and store.hget(counts, "results") == "20"
            assert int(store.hget(counts, "header")) >= 20
    finally:
        store.delete(counts)
        from amqprpc.testing import delete_queues
        from amqprpc.wire.topology import DEFAULT_TOPOLOGY

        delete_queues(f"service.{name}.request", *DEFAULT_TOPOLOGY.retry_queue_names(name, [f"service.{name}.request"]),
                      broker_url=broker_url)

