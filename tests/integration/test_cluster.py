"""Past one node: a 3-node RabbitMQ cluster of this test module's own (the version under
test: the system's 3.10, or 4.x under ``make test-rabbitmq4``), quorum request and event
queues, a failover URL list. The node the worker and the client are connected to is killed
(kill -9) or stopped while calls, casts and events flow, and:

- no accepted (broker-confirmed) cast or event is lost;
- calls fail for RECOVERY_BOUND_S at most (from the first failing call to the last one), all
  within FAILURE_WINDOW_S of the failure, and then keep succeeding: in the same worker process
  and the same client (nothing restarted).

Select them with ``-m cluster`` (``-m "not cluster"`` leaves them out).
"""
from __future__ import annotations

import threading
import time

import pytest

from amqprpc import RpcClient
from amqprpc.testing import delete_queues, unique_name, wait_for
from rabbit_node import RabbitCluster
from workerproc import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

# Calls fail from the moment the connection drops until the client has reconnected and the
# quorum queue has a leader again (an election among the two nodes left); see README,
# "Running at scale" for the measured times. The bound leaves room for a loaded machine.
RECOVERY_BOUND_S = 10.0
# A stopping node closes its connections a while after `rabbitmqctl stop` began (seconds).
FAILURE_WINDOW_S = 30.0
# After recovering, calls must keep succeeding this long.
STEADY_S = 3.0
CALL_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def cluster():
    nodes = RabbitCluster(3)
    nodes.start()
    yield nodes
    nodes.stop()




class Load:
    """Threads calling, casting and publishing events until stopped; every outcome is kept
    with its monotonic time, and every accepted cast and event by its number."""

    def __init__(self, client: RpcClient, svc: str, done: str) -> None:
        self.client, self.svc, self.done = client, svc, done
        self.calls: list[tuple[float, str]] = []  # (time, "ok" or the error's type)
        self.casts: list[int] = []
        self.events: list[int] = []
        self.refused = {"cast": 0, "event": 0}
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=target, daemon=True)
                        for target in (self._call, self._call, self._cast, self._event)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join(30)

    def _call(self) -> None:
        n = 0
        while not self.halt.is_set():
            n += 1
            try:
                self.client.call(self.svc, "work", {"n": f"call.{n}", "done": self.done, "sleep": 0},
                                 timeout=CALL_TIMEOUT_S)
                self.calls.append((time.monotonic(), "ok"))
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, by type
                self.calls.append((time.monotonic(), type(exc).__name__))
                time.sleep(0.05)

    def _cast(self) -> None:
        self._publish(self.casts, "cast", lambda n: self.client.cast(
            self.svc, "work", {"n": n, "done": self.done, "sleep": 0}, timeout=5))

    def _event(self) -> None:
        self._publish(self.events, "event", lambda n: self.client.publish_event(
            f"{self.svc}.happened", {"n": n, "done": self.done}, timeout=5))

    def _publish(self, accepted: list, kind: str, send) -> None:
        n = 0
        while not self.halt.is_set():
            n += 1
            try:
                send(n)
                accepted.append(n)
            except Exception:  # noqa: BLE001 - not accepted: the caller was told
                self.refused[kind] += 1
            time.sleep(0.01)

    def succeeded_calls(self) -> int:
        return sum(1 for _, outcome in self.calls if outcome == "ok")


@pytest.mark.parametrize("failure", ["kill -9", "stop"])
def test_the_node_under_the_worker_and_the_client_fails_under_load(cluster, done_counts, tmp_path, failure):
    redis_client, done = done_counts
    victim = cluster.nodes[0] if failure == "kill -9" else cluster.nodes[1]
    # Worker and client connect to the victim first; the failover list names the others.
    url = ";".join(node.url for node in [victim] + [n for n in cluster.nodes if n is not victim])
    svc = unique_name("cluster")
    worker = WorkerProcess(svc, str(tmp_path / "worker.log"), "--queue-type", "quorum", "--reconnect-cap", "1",
                           "--concurrency", "4", broker_url=url)
    load = None
    try:
        worker.wait_event("worker ready")
        with RpcClient("cluster-test", broker_url=url, timeout=CALL_TIMEOUT_S, reconnect_cap=1.0) as client:
            load = Load(client, svc, done)
            load.start()
            wait_for(lambda: load.succeeded_calls() >= 50 and len(load.casts) >= 20 and len(load.events) >= 20,
                     timeout=30)
            failed_at = time.monotonic()
            victim.kill() if failure == "kill -9" else victim.halt()
            # Recovered: calls have succeeded for STEADY_S since the last failure.
            wait_for(lambda: _last_failure(load.calls, failed_at) + STEADY_S < time.monotonic()
                     and load.calls[-1][1] == "ok", timeout=FAILURE_WINDOW_S + RECOVERY_BOUND_S + STEADY_S, interval=0.1)
            load.stop()
            assert client._loop.alive and worker.process.poll() is None, "a process was restarted or died"
        outcomes = [(t - failed_at, outcome) for t, outcome in load.calls if t >= failed_at]
        failures = [t for t, outcome in outcomes if outcome != "ok"]
        outage = max(failures) - min(failures) if failures else 0.0
        last_failure = max(failures, default=0.0)

        def processed() -> dict:
            return redis_client.hgetall(done)

        expected = {str(n) for n in load.casts} | {f"event.{n}" for n in load.events}
        try:
            wait_for(lambda: expected <= set(processed()), timeout=60, interval=0.2)
        except AssertionError:
            lost = sorted(expected - set(processed()))
            raise AssertionError(f"{len(lost)} accepted casts/events were lost: {lost[:20]}\n{worker.text()}") from None
        kinds = sorted({outcome for _, outcome in outcomes if outcome != "ok"})
        print(f"\ncluster {failure} {victim.name}: calls failed for {outage:.2f} s (the last {last_failure:.2f} s "
              f"after the failure; {len(failures)} failed: {kinds}), "
              f"{load.succeeded_calls()} calls ok; {len(load.casts)} casts and {len(load.events)} events accepted, "
              f"0 lost ({load.refused['cast']} casts and {load.refused['event']} events refused to their caller)")
        assert outage < RECOVERY_BOUND_S, f"calls failed for {outage:.1f} s"
        assert last_failure < FAILURE_WINDOW_S, f"calls still failed {last_failure:.1f} s after the node failed"
    finally:
        if load is not None:
            load.stop()
        worker.kill()
        if not victim.running:
            victim.start()
        delete_queues(f"service.{svc}.request", f"service.{svc}.event.happened", f"service.{svc}.dead",
                      broker_url=cluster.url)


def _last_failure(calls: list[tuple[float, str]], since: float) -> float:
    return max((t for t, outcome in calls if t >= since and outcome != "ok"), default=since)
