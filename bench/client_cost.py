"""``python -m bench.client_cost [--calls N] [--profile]``: the client's cost of one call at a time.

Starts the bench's amqprpc worker as a subprocess, warms up, then makes ``--calls`` calls one
at a time from an RpcClient in this process and prints this process's CPU µs and voluntary
context switches per call (all its threads). ``--profile`` prints cProfile's top functions of
the caller's thread instead.

Instructions per call, independent of the machine's load (user space only: the kernel's
share of a wake-up is not counted), the calls alone counted::

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg \
        python -m bench.client_cost --calls 1000 --callgrind
    # the "Collected" total / 1000
"""
from __future__ import annotations

import argparse
import os
import pstats
import time
from typing import Any

from amqprpc.config import broker_url as default_broker_url
from amqprpc.testing import delete_queues, unique_name
from amqprpc.wire.topology import DEFAULT_TOPOLOGY

from .__main__ import PAYLOAD, _spawn
from .measure import switches
from .rpc_side import RpcSide


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.client_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--warm", type=int, default=100)
    parser.add_argument("--profile", action="store_true", help="cProfile the calls (the caller's thread)")
    parser.add_argument("--callgrind", action="store_true",
                        help="under valgrind --tool=callgrind --instr-atstart=no: count the calls only")
    args = parser.parse_args(argv)
    url = default_broker_url(None)
    service = unique_name("bench-svc")
    worker = _spawn("amqprpc", url, service)
    loop_profile = _profile_loop_thread() if args.profile else None
    side = RpcSide(url, service, PAYLOAD)
    try:
        side.sequential(args.warm)
        load = os.getloadavg()
        if args.callgrind:
            _callgrind("on")
        cpu, switched, wall = time.process_time(), switches(os.getpid()), time.perf_counter()
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.runcall(side.sequential, args.calls)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        else:
            side.sequential(args.calls)
        cpu, switched = time.process_time() - cpu, switches(os.getpid()) - switched
        if args.callgrind:
            _callgrind("off")
        wall = time.perf_counter() - wall
    finally:
        side.close()
        worker.stdin.close()
        worker.wait(15)
        delete_queues(DEFAULT_TOPOLOGY.request_queue(service).name, broker_url=url)
    if loop_profile is not None:
        print("--- loop thread ---")
        pstats.Stats(loop_profile).sort_stats("tottime").print_stats(25)
    lender = getattr(side.client, "_lender", None)
    if lender is not None:  # leader/follower reads (amqprpc.transport.readtoken)
        print(f"socket lent {lender.lends} times, taken back {lender.reclaims}; calls that read their own reply: "
              f"{lender.leads}")
    if args.calls:
        print(f"calls {args.calls}: client CPU {cpu / args.calls * 1e6:.1f} us/call, "
              f"voluntary switches {switched / args.calls:.2f}/call, wall {wall / args.calls * 1e6:.0f} us/call; "
              f"load average {load[0]:.2f}")


def _callgrind(state: str) -> None:
    """Switch callgrind's counting on or off for this process (all its threads)."""
    import subprocess

    subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True, capture_output=True)


def _profile_loop_thread() -> Any:
    """A cProfile.Profile that the client's loop thread (started after this) runs under (the
    warm-up included: read it after a run of thousands of calls)."""
    import cProfile

    from amqprpc.transport.ioloop import AmqpLoop

    profiler = cProfile.Profile()
    run = AmqpLoop._run

    def profiled(loop: AmqpLoop) -> None:
        profiler.runcall(run, loop)

    AmqpLoop._run = profiled  # type: ignore[method-assign]
    return profiler


if __name__ == "__main__":
    main()
