"""Samples, percentiles and the interleaving of the two sides.

Every scenario runs in rounds that alternate amqprpc and raw (and swap which goes first),
so that load from other processes on the machine falls on both sides alike; a side's
figures are then pooled over its rounds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Sample:
    """One timed run: ``count`` operations in ``seconds``, with per-operation latencies (s)."""

    count: int = 0
    seconds: float = 0.0
    latencies: list = field(default_factory=list)
    errors: int = 0

    def add(self, other: "Sample") -> None:
        self.count += other.count
        self.seconds += other.seconds
        self.latencies.extend(other.latencies)
        self.errors += other.errors

    def figures(self) -> dict:
        lat = sorted(self.latencies)
        out = {"count": self.count, "errors": self.errors, "seconds": round(self.seconds, 3),
               "per_s": round(self.count / self.seconds, 1) if self.seconds else None}
        if lat:
            out.update(p50_ms=round(percentile(lat, 50) * 1e3, 3), p99_ms=round(percentile(lat, 99) * 1e3, 3),
                       mean_ms=round(sum(lat) / len(lat) * 1e3, 3))
        return out


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
    for key in ("per_s", "p50_ms", "p99_ms", "mean_ms"):
        if ours.get(key) and raw.get(key):
            out[key] = round(ours[key] / raw[key], 3)
    return out


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of a process in MB (from /proc; Linux)."""
    with open(f"/proc/{pid or os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 2)
    raise RuntimeError("no VmRSS in /proc status")
