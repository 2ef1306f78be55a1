"""``python -m bench.switches [--calls N]``: per thread, how often each sleeps per call.

Runs the bench's amqprpc worker as a subprocess and makes ``--calls`` calls one at a
time from an RpcClient in this process, then prints, per thread of the worker and of
this process, voluntary context switches (the thread slept: a wait, a hand-off, a GIL
wait) and involuntary ones per call, and CPU ticks, from /proc/<pid>/task (Linux).
A thread woken for nothing shows up here; raw py-amqp sleeps once per call on each side.
"""
from __future__ import annotations

import argparse
import os

from amqprpc.config import broker_url as default_broker_url
from amqprpc.testing import delete_queues, unique_name
from amqprpc.wire.topology import DEFAULT_TOPOLOGY

from .__main__ import PAYLOAD, _spawn
from .rpc_side import RpcSide


def per_thread(pid: int) -> dict[str, tuple[str, int, int, int]]:
    """tid -> (name, voluntary switches, involuntary switches, CPU ticks)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm, open(f"/proc/{pid}/task/{tid}/status") as status_file, \
                    open(f"/proc/{pid}/task/{tid}/stat") as stat_file:
                name, status, stat = comm.read().strip(), status_file.read(), stat_file.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        voluntary = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        involuntary = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        out[tid] = (name, voluntary, involuntary, int(stat[11]) + int(stat[12]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.switches", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args(argv)
    url = default_broker_url(None)
    service = unique_name("bench-svc")
    worker = _spawn("amqprpc", url, service)
    side = RpcSide(url, service, PAYLOAD)
    try:
        side.sequential(300)  # warm-up
        before = {"worker": per_thread(worker.pid), "client": per_thread(os.getpid())}
        side.sequential(args.calls)
        after = {"worker": per_thread(worker.pid), "client": per_thread(os.getpid())}
    finally:
        side.close()
        worker.stdin.close()
        delete_queues(DEFAULT_TOPOLOGY.request_queue(service).name, broker_url=url)
    for process, threads in after.items():
        print(process)
        for tid, (name, voluntary, involuntary, ticks) in threads.items():
            was = before[process].get(tid)
            if was is None or (voluntary, involuntary, ticks) == was[1:]:
                continue
            print(f"  {tid:>8} {name:16} voluntary/call {(voluntary - was[1]) / args.calls:.2f}  "
                  f"involuntary/call {(involuntary - was[2]) / args.calls:.2f}  cpu ticks {ticks - was[3]}")


if __name__ == "__main__":
    main()
