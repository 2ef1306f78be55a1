"""The CPU-bound service ``bench.prefork`` runs (``--app bench.cpu_app:service``); its name
comes from ``AMQPRPC_BENCH_SERVICE``."""
import os

from amqprpc import Service

service = Service(os.environ.get("AMQPRPC_BENCH_SERVICE", "bench-cpu"))


@service.handler
def burn(payload: dict) -> int:
    """``loops`` turns of a pure-Python loop: the GIL held throughout."""
    total = 0
    for i in range(int(payload["loops"])):
        total += i * i % 7
    return total
