"""Samples, percentiles and the interleaving of the two sides.

Every scenario runs in rounds that alternate amqprpc and raw (and swap which goes first),
so that load from other processes on the machine falls on both sides alike; a side's
figures are then pooled over its rounds.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable


@dataclass
class Sample:
    """One timed run: ``count`` operations in ``seconds``, with per-operation latencies (s)."""

    count: int = 0
    seconds: float = 0.0
    latencies: list = field(default_factory=list)
    errors: int = 0
    # CPU seconds the run cost this (client) process and the side's server processes:
    # less disturbed by a loaded machine than wall time (see :func:`cpu_of`).
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    # Voluntary context switches (a thread blocked: waiting to be woken, a hand-off).
    client_switches: int = 0
    server_switches: int = 0

    def add(self, other: "Sample") -> None:
        self.count += other.count
        self.seconds += other.seconds
        self.latencies.extend(other.latencies)
        self.errors += other.errors
        self.client_cpu += other.client_cpu
        self.server_cpu += other.server_cpu
        self.client_switches += other.client_switches
        self.server_switches += other.server_switches

    def figures(self) -> dict:
        lat = sorted(self.latencies)
        out = {"count": self.count, "errors": self.errors, "seconds": round(self.seconds, 3),
               "per_s": round(self.count / self.seconds, 1) if self.seconds else None}
        if self.count and (self.client_cpu or self.server_cpu):
            out.update(client_cpu_us=round(self.client_cpu / self.count * 1e6, 1),
                       server_cpu_us=round(self.server_cpu / self.count * 1e6, 1),
                       client_switches=round(self.client_switches / self.count, 2),
                       server_switches=round(self.server_switches / self.count, 2))
        if lat:
            out.update(p50_ms=round(percentile(lat, 50) * 1e3, 3), p99_ms=round(percentile(lat, 99) * 1e3, 3),
                       mean_ms=round(sum(lat) / len(lat) * 1e3, 3))
        return out


async def from_tasks(count: int, in_flight: int, call: Callable[[], Awaitable[Any]]) -> Sample:
    """``count`` awaited ``call()``s from ``in_flight`` tasks on this event loop, each awaiting
    one after another; every latency recorded, failures counted."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    todo = iter(range(count))  # shared by the tasks: one event loop, no lock needed

    async def task() -> None:
        for _ in todo:
            t0 = time.perf_counter()
            try:
                await call()
            except Exception as exc:  # noqa: BLE001 - counted in the figures
                errors.append(exc)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(min(in_flight, count))))
    return Sample(count, time.perf_counter() - started, latencies, len(errors))


def percentile(sorted_values: list, pct: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    rank = max(0, min(len(sorted_values) - 1, int(round(pct / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[rank]


def interleaved(rounds: int, count: int, ours: Callable[[int], Sample], raw: Callable[[int], Sample]) -> dict:
    """Run ``count`` operations per side split over ``rounds`` alternating rounds."""
    per_round = max(1, count // rounds)
    pooled = {"amqprpc": Sample(), "raw": Sample()}
    for index in range(rounds):
        order = [("amqprpc", ours), ("raw", raw)]
        if index % 2:
            order.reverse()
        for side, run in order:
            pooled[side].add(run(per_round))
    result = {side: sample.figures() for side, sample in pooled.items()}
    result["ratio"] = ratios(result["amqprpc"], result["raw"])
    return result


def ratios(ours: dict, raw: dict) -> dict:
    """amqprpc / raw for every figure both have (>1 = amqprpc higher)."""
    out = {}
    for key in ("per_s", "p50_ms", "p99_ms", "mean_ms", "client_cpu_us", "server_cpu_us", "client_switches",
                "server_switches"):
        if ours.get(key) and raw.get(key):
            out[key] = round(ours[key] / raw[key], 3)
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(run: Callable[[int], Sample], server_pids: Callable[[], list]) -> Callable[[int], Sample]:
    """``run`` that also records the CPU time it cost this process (precise) and the
    server processes (``/proc`` ticks, 10 ms: meaningful over a scenario's rounds), and
    their voluntary context switches. Per call, both stay comparable under load where
    calls/s does not."""
    def measured(count: int) -> Sample:
        pids = server_pids()
        client, servers = time.process_time(), sum(map(server_cpu_seconds, pids))
        client_switches, server_switches = switches(os.getpid()), sum(map(switches, pids))
        sample = run(count)
        sample.client_cpu = time.process_time() - client
        sample.server_cpu = sum(map(server_cpu_seconds, pids)) - servers
        sample.client_switches = switches(os.getpid()) - client_switches
        sample.server_switches = sum(map(switches, pids)) - server_switches
        return sample
    return measured


def switches(pid: int) -> int:
    """Voluntary context switches of a process's live threads so far."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
                        break
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return total


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of a process in MB (from /proc; Linux)."""
    with open(f"/proc/{pid or os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 2)
    raise RuntimeError("no VmRSS in /proc status")
