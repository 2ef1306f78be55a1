"""Many callers and many requests in flight: everyone gets their own answer, nothing breaks."""
import threading

import pytest

from amqprpc import RpcClient
from amqprpc.testing import running_worker

pytestmark = pytest.mark.integration


def test_32_threads_x_100_calls_through_one_client_get_their_own_answers(service, broker_url):
    service.handler("echo")(lambda payload: payload)
    wrong, errors = [], []

    def caller(thread_no):
        for n in range(100):
            try:
                answer = client.call(service.name, "echo", {"t": thread_no, "n": n}, timeout=30)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
                continue
            if answer != {"t": thread_no, "n": n}:
                wrong.append(answer)

    with running_worker(service, concurrency=8), RpcClient("load", broker_url=broker_url) as client:
        threads = [threading.Thread(target=caller, args=(t,)) for t in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert errors == [] and wrong == []


def test_256_in_flight_against_prefetch_256_completes_without_error(service, broker_url):
    # Replies are published by the loop thread, never from inside a delivery callback:
    # py-amqp's publish-time drain used to recurse here until RecursionError.
    service.handler("echo")(lambda payload: payload["n"])
    with running_worker(service, concurrency=16, prefetch=256), RpcClient("load", broker_url=broker_url) as client:
        for _ in range(4):
            futures = [client.call_async(service.name, "echo", {"n": n}, timeout=30) for n in range(256)]
            assert [f.result(60) for f in futures] == list(range(256))
