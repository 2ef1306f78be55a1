"""``python -m bench.profile [--mode sequential|pipelined] [--calls N]``: where the time goes.

Runs the amqprpc worker as a subprocess and a client in this process, samples both with
py-spy (``pip install py-spy``; needs ptrace rights) while the client makes ``--calls``
calls, and prints the functions with the most samples (self and inclusive), per process.
Collapsed stacks are kept in bench/results/ for flame graphs.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from amqprpc.config import broker_url as default_broker_url
from amqprpc.testing import delete_queues, unique_name

from .__main__ import PAYLOAD, _spawn
from .rpc_side import RpcSide

RESULTS = Path(__file__).parent / "results"


def summarize(path: Path, top: int = 25) -> str:
    """Top functions by self and inclusive samples from py-spy's collapsed (raw) output."""
    self_samples, inclusive, total = collections.Counter(), collections.Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        count = int(count)
        frames = [f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")") for f in stack.split(";")[1:]]
        if not frames:
            continue
        total += count
        self_samples[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    out = [f"{path.name}: {total} samples (threads holding the GIL)", "  self%  incl%  function"]
    for frame, count in self_samples.most_common(top):
        out.append(f"  {100 * count / total:5.1f}  {100 * inclusive[frame] / total:5.1f}  {frame}")
    out.append("  -- inclusive --")
    for frame, count in inclusive.most_common(top):
        out.append(f"  {100 * self_samples[frame] / total:5.1f}  {100 * count / total:5.1f}  {frame}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--mode", choices=("sequential", "pipelined", "threads"), default="sequential")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    url = default_broker_url()
    service = unique_name("bench-prof")
    server = _spawn("amqprpc", url, service)
    side = RpcSide(url, service, PAYLOAD)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    outs = {name: RESULTS / f"profile-{stamp}-{args.mode}-{name}.txt" for name in ("client", "worker")}
    try:
        side.calls(200)
        spies = [subprocess.Popen([py_spy, "record", "--format", "raw", "--threads", "--rate", str(args.rate),
                                   "--nonblocking", "--gil", "-o", str(outs[name]), "--pid", str(pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name, pid in (("client", os.getpid()), ("worker", server.pid))]
        time.sleep(1.0)
        started = time.perf_counter()
        sample = {"sequential": lambda: side.sequential(args.calls), "pipelined": lambda: side.pipelined(args.calls, 32),
                  "threads": lambda: side.threads(args.calls, 8)}[args.mode]()
        print(f"{args.calls} calls in {time.perf_counter() - started:.2f}s: {sample.figures()}")
        for spy in spies:
            spy.send_signal(2)
        for spy in spies:
            spy.wait(30)
    finally:
        side.close()
        server.stdin.close()
        server.wait(15)
        delete_queues(f"service.{service}.request", broker_url=url)
    for path in outs.values():
        if path.exists():
            print(summarize(path))


if __name__ == "__main__":
    main()
