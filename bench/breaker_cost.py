"""What a circuit breaker costs per call, local and shared through Redis (and pybreaker's, if installed).

    .venv/bin/python bench/breaker_cost.py [--calls N] [--redis URL]

Measured in one run, interleaved in rounds so that a busy machine skews every variant alike:
1. breaker overhead alone (before_call + record of a success, no broker): process-local,
   Redis-shared with the cached view (the default), and Redis-shared with sync_interval=0
   (a Lua script on every call: what the cache saves);
2. real calls through RpcClient to an in-process echo worker, without and with a breaker;
3. pybreaker 1.x (memory and CircuitRedisStorage) calling a no-op, for comparison.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import redis

from amqprpc import CircuitBreaker, RpcClient, Service, logs
from amqprpc.testing import running_worker, unique_name


def per_call_us(fn, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def overhead(breaker: CircuitBreaker):
    def one():
        breaker.record(breaker.before_call("svc", "a"), None)
    return one


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis", default=os.environ.get("AMQPRPC_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    logs.configure("console", "warning")
    prefix = unique_name("bench:breaker")
    variants = {
        "breaker, process-local": overhead(CircuitBreaker(shared=False)),
        "breaker, redis, cached view (default)": overhead(CircuitBreaker(redis_url=args.redis, key_prefix=prefix)),
        "breaker, redis, script every call": overhead(CircuitBreaker(redis_url=args.redis, key_prefix=prefix + "x",
                                                                     sync_interval=0)),
    }
    try:
        import pybreaker

        variants["pybreaker, memory"] = (lambda b: lambda: b.call(lambda: None))(pybreaker.CircuitBreaker())
        storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, redis.Redis.from_url(args.redis),
                                                namespace=prefix + "py")
        variants["pybreaker, CircuitRedisStorage"] = (lambda b: lambda: b.call(lambda: None))(
            pybreaker.CircuitBreaker(state_storage=storage))
    except ImportError:
        print("(pybreaker not installed: pip install pybreaker to compare)")

    service = Service(unique_name("bench-breaker"))
    service.handler("echo")(lambda payload: payload)
    results: dict[str, list[float]] = {}
    with running_worker(service, concurrency=1) as _worker, \
            RpcClient("bench", timeout=10) as plain, \
            RpcClient("bench", timeout=10, breaker=CircuitBreaker(shared=False)) as local, \
            RpcClient("bench", timeout=10, breaker=CircuitBreaker(redis_url=args.redis, key_prefix=prefix)) as shared:
        calls = {
            "call, no breaker": lambda: plain.call(service.name, "echo", {}),
            "call, breaker process-local": lambda: local.call(service.name, "echo", {}),
            "call, breaker redis (cached)": lambda: shared.call(service.name, "echo", {}),
        }
        for fn in calls.values():
            for _ in range(100):
                fn()  # warm up
        for _ in range(args.rounds):
            for name, fn in variants.items():
                results.setdefault(name, []).append(per_call_us(fn, args.calls))
            for name, fn in calls.items():
                results.setdefault(name, []).append(per_call_us(fn, max(args.calls // 4, 100)))
    r = redis.Redis.from_url(args.redis)
    for key in r.scan_iter(match=f"{prefix}*"):
        r.delete(key)
    print(f"{'variant':45} {'median us/call':>15} {'min':>10} {'max':>10}   ({args.rounds} rounds)")
    for name, values in results.items():
        print(f"{name:45} {statistics.median(values):15.1f} {min(values):10.1f} {max(values):10.1f}")


if __name__ == "__main__":
    main()
