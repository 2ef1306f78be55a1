"""Time limits in real worker processes against the real broker: a ``while True: pass``
handler with ``time_limit=1`` ends within 1.5 s and the worker keeps serving; --time-limit
is the default of every handler; a handler stuck in a blocking call is abandoned after
--hard-time-limit (its message dead-lettered with the reason, its thread replaced) and past
--max-abandoned the worker exits 1; with --processes the child is recycled instead."""
from __future__ import annotations

import signal
import time

import pytest

from amqprpc import RemoteError
from amqprpc.ops import dlq
from amqprpc.testing import wait_for
from rabbit_node import free_port
from test_daemon import _scrape
from test_prefork import client, r, svc  # noqa: F401 - fixtures
from workerproc import WorkerProcess

pytestmark = pytest.mark.integration

APP = "tasks_app:service"


def start(svc, tmp_path, *args, ready="worker ready") -> WorkerProcess:
    worker = WorkerProcess(svc, str(tmp_path / "w.log"), *args, app=APP)
    worker.wait_event(ready)
    return worker


def test_a_busy_loop_with_time_limit_1_ends_within_1_5_s_and_the_worker_keeps_serving(svc, client, r, tmp_path):
    started_key, stopped_key, done = r.test_key("started"), r.test_key("stopped"), r.test_key("done")
    port = free_port()
    worker = start(svc, tmp_path, "--concurrency", "2", "--metrics-port", str(port))
    try:
        began = time.monotonic()
        with pytest.raises(RemoteError) as caught:
            client.call(svc, "spin", {"started": started_key, "stopped": stopped_key}, timeout=10)
        answered_in = time.monotonic() - began
        assert caught.value.error_type == "TimeLimitExceeded"
        ran_for = float(r.get(stopped_key)) - float(r.get(started_key))
        assert 0.9 <= ran_for <= 1.5 and answered_in <= 1.5 + 0.5
        for n in range(5):  # every handler thread still serves
            assert client.call(svc, "work", {"n": n, "done": done}, timeout=10)["n"] == n
        scraped = _scrape(port)
        assert scraped[("amqprpc_timed_out_total", ())] == 1 and scraped[("amqprpc_abandoned_total", ())] == 0
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    finally:
        worker.kill()
    stopped = worker.events("worker stopped")[-1]
    assert stopped["timed_out"] == 1 and stopped.get("abandoned", 0) == 0 and stopped["succeeded"] == 5
    print(f"\nwhile True: pass under time_limit=1: stopped after {ran_for:.3f} s, answered in {answered_in:.3f} s")


def test_time_limit_option_is_the_default_of_every_handler(svc, client, tmp_path):
    worker = start(svc, tmp_path, "--time-limit", "0.3")
    try:
        with pytest.raises(RemoteError) as caught:
            client.call(svc, "burn", {"loops": 10**10}, timeout=10)
        assert caught.value.error_type == "TimeLimitExceeded"
        assert client.call(svc, "burn", {"loops": 10}, timeout=10) == sum(i * i % 7 for i in range(10))
    finally:
        worker.kill()


def test_a_blocking_handler_is_abandoned_dead_lettered_replaced_and_too_many_exit_1(svc, client, r, tmp_path):
    started_key, done = r.test_key("started"), r.test_key("done")
    worker = start(svc, tmp_path, "--concurrency", "1", "--hard-time-limit", "0.5", "--max-abandoned", "1")
    try:
        client.cast(svc, "block", {"started": started_key, "sleep": 60})
        worker.wait_event("handler ignored its time limit: abandoned", timeout=10)
        # Its one handler thread is stuck, yet the worker serves: a new thread took its place.
        assert client.call(svc, "work", {"n": 1, "done": done}, timeout=10)["n"] == 1
        wait_for(lambda: dlq.inspect(svc)[0] == 1, timeout=10)
        letter = dlq.inspect(svc)[1][0]
        assert letter["error_type"] == "TimeLimitExceeded" and "abandoned" in letter["error"]
        client.cast(svc, "block", {"started": started_key, "sleep": 60})  # a second one: past --max-abandoned
        assert worker.wait(30) == 1, worker.text()
    finally:
        worker.kill()
    assert r.get(started_key) == "2"
    assert worker.events("exiting for a restart by the supervisor")
    assert worker.events("worker stopped")[-1]["abandoned"] == 2


def test_with_processes_the_child_of_an_abandoned_handler_is_recycled(svc, client, r, tmp_path):
    started_key, done = r.test_key("started"), r.test_key("done")
    worker = start(svc, tmp_path, "--processes", "1", "--concurrency", "2", "--hard-time-limit", "0.5",
                   ready="all children ready")
    try:
        client.cast(svc, "block", {"started": started_key, "sleep": 60})
        worker.wait_event("child recycled", timeout=15)
        recycled = worker.events("child recycled")[0]
        assert recycled["reason"] == "abandoned-handler"
        wait_for(lambda: len(worker.events("child ready")) == 2, timeout=10)
        assert client.call(svc, "work", {"n": 1, "done": done}, timeout=10)["n"] == 1
        wait_for(lambda: dlq.inspect(svc)[0] == 1, timeout=10)
        worker.wait_event("recycled child exited", timeout=15)
        worker.process.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.text()
    finally:
        worker.kill()
    assert r.get(started_key) == "1"  # dead-lettered, not redelivered to the new child
