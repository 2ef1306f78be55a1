"""The service the process and time-limit tests run in real worker processes
(``--app tasks_app:service``); its name comes from ``AMQPRPC_TEST_SERVICE``. Handlers count
in Redis, under keys the test passes in, what ran."""
import os
import time

import redis

from amqprpc import Service, TimeLimitExceeded
from amqprpc.config import redis_url

service = Service(os.environ.get("AMQPRPC_TEST_SERVICE", "tasks-test"))
_redis = redis.Redis.from_url(redis_url())


@service.handler
def work(payload: dict) -> dict:
    """Sleep ``sleep`` seconds, then count request ``n`` done (and by which process)."""
    time.sleep(float(payload.get("sleep", 0.01)))
    _redis.hincrby(payload["done"], str(payload["n"]), 1)
    if payload.get("pids"):
        _redis.sadd(payload["pids"], os.getpid())
    return {"n": payload["n"], "pid": os.getpid()}


@service.handler
def burn(payload: dict) -> int:
    """CPU only: ``loops`` turns of a pure-Python loop (the GIL held throughout)."""
    started = time.time()
    total = 0
    for i in range(int(payload["loops"])):
        total += i * i % 7
    if payload.get("done"):
        _redis.hincrby(payload["done"], str(payload["n"]), 1)
    if payload.get("spans"):  # when and where it ran
        _redis.rpush(payload["spans"], f"{os.getpid()} {started} {time.time()}")
    return total


@service.handler(time_limit=1)
def spin(payload: dict) -> None:
    """Never returns by itself: pure Python, so its time limit stops it."""
    if payload.get("started"):
        _redis.set(payload["started"], time.time())
    try:
        while True:
            pass
    except TimeLimitExceeded:
        if payload.get("stopped"):
            _redis.set(payload["stopped"], time.time())
        raise


@service.handler(time_limit=0.5)
def block(payload: dict) -> None:
    """Sits in a blocking call the time limit cannot interrupt: abandoned after the grace."""
    if payload.get("started"):
        _redis.incr(payload["started"])
    time.sleep(float(payload.get("sleep", 30)))


_leaked: list = []


@service.handler
def leak(payload: dict) -> int:
    """Keeps ``mb`` more megabytes for good (touched, so resident): a leaking handler."""
    _leaked.append(bytearray(int(payload["mb"]) << 20))
    return os.getpid()


@service.handler
def hold_gil(payload: dict) -> None:
    """C code that holds the GIL (libc's sleep through ctypes.PyDLL): no thread of this
    process runs meanwhile, not even the time limit's watchdog."""
    import ctypes

    ctypes.PyDLL(None).sleep(int(payload.get("seconds", 60)))
