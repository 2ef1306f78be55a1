"""Per-action outcome counts and a latency sketch, small enough to ride in a registry heartbeat.

The registry's :class:`~amqprpc.ops.registry.Presence` middleware feeds every delivery's
:class:`~amqprpc.outcome.Outcome` (``after_handle``, corrected by ``outcome_amended``) into
one :class:`ActionStats` per service, and each heartbeat carries :meth:`ActionStats.summary`:
what ``amqprpc dashboard`` shows per action without asking the workers anything.

Bounded on purpose: at most ``max_actions`` actions are tracked by name (the rest are summed
under ``"(other)"``: an action name comes from the wire), and latencies go into a fixed set of
log-spaced buckets (:data:`BUCKETS`, ~25 % wide) rather than a list of samples, so the
summary of a worker that ran a billion calls is the same few hundred bytes as one that ran
ten, and recording one outcome is a dict lookup and two integer increments under a lock.
The quantiles read from the buckets are upper bounds of the bucket they fall in (at most
~25 % high), which is what a dashboard needs to tell 3 ms from 300 ms.

Counts are since the worker started (like ``worker.stats``); a restarted worker starts from
zero, and readers add up the live instances of a service.
"""
from __future__ import annotations

import bisect
import threading
from typing import Any

from amqprpc.outcome import Outcome, OutcomeKind

OTHER = "(other)"
DEFAULT_MAX_ACTIONS = 50

# Upper bounds in seconds: 0.1 ms .. ~100 s, each ~1.26x the one before (10 per decade).
BUCKETS: tuple[float, ...] = tuple(round(1e-4 * 10 ** (i / 10), 7) for i in range(61))

_LAST = len(BUCKETS) - 1

# Which counters an outcome adds to (as worker.stats counts them).
_COUNTERS: dict[OutcomeKind, tuple[str, ...]] = {
    OutcomeKind.REPLIED: ("succeeded",), OutcomeKind.DONE: ("succeeded",), OutcomeKind.FAILED: ("failed",),
    OutcomeKind.RETRIED: ("failed", "retried"), OutcomeKind.DEAD_LETTERED: ("failed", "dead_lettered"),
    OutcomeKind.REFUSED: ("refused",), OutcomeKind.EXPIRED: ("expired",), OutcomeKind.RECOUNTED: (),
}
COUNTERS = ("succeeded", "failed", "retried", "dead_lettered", "expired", "refused")


class _Action:
    __slots__ = ("counts", "latency")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.latency: dict[int, int] = {}  # bucket index -> runs (sparse: most actions use a few buckets)


class ActionStats:
    """Outcome counters and latency buckets per action (thread-safe, bounded)."""

    def __init__(self, max_actions: int = DEFAULT_MAX_ACTIONS) -> None:
        self.max_actions = max_actions
        self._actions: dict[str, _Action] = {}
        self._lock = threading.Lock()

    def _slot(self, action: str | None) -> _Action:
        name = action if isinstance(action, str) and action else OTHER
        slot = self._actions.get(name)
        if slot is None:
            if len(self._actions) >= self.max_actions and name != OTHER:
                return self._slot(OTHER)
            slot = self._actions[name] = _Action()
        return slot

    def record(self, action: str | None, outcome: Outcome) -> None:
        """Count one delivery's outcome; a handler that ran adds its duration to the sketch."""
        keys = _COUNTERS.get(outcome.kind) or _counters(outcome)
        timed = outcome.kind is not OutcomeKind.RECOUNTED
        index = min(bisect.bisect_left(BUCKETS, outcome.duration), _LAST) if timed else 0
        with self._lock:
            slot = self._actions.get(action) if action else None
            if slot is None:
                slot = self._slot(action)
            counts = slot.counts
            for key in keys:
                counts[key] = counts.get(key, 0) + 1
            if timed:
                latency = slot.latency
                latency[index] = latency.get(index, 0) + 1

    def amend(self, action: str | None, old: Outcome, new: Outcome) -> None:
        """An outcome that was corrected after the fact (dead-lettered instead of replied)."""
        with self._lock:
            slot = self._slot(action)
            for key in _counters(old):
                slot.counts[key] = slot.counts.get(key, 0) - 1
            for key in _counters(new):
                slot.counts[key] = slot.counts.get(key, 0) + 1

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{action: {succeeded, failed, retried, dead_lettered, expired, refused, runs,
        p50, p95, latency}}``; p50/p95 in seconds (None before the first run); ``latency``
        is the sparse bucket histogram (``{index: runs}``, see :data:`BUCKETS`) so that
        readers can merge instances with :func:`merge`."""
        with self._lock:
            return {name: _describe(dict(slot.counts), dict(slot.latency)) for name, slot in self._actions.items()}


def _counters(outcome: Outcome) -> tuple[str, ...]:
    # A kind added later (a feature's own: revoked, duplicate...) counts under its own name.
    found = _COUNTERS.get(outcome.kind)
    return found if found is not None else (str(getattr(outcome.kind, "value", outcome.kind)),)


def quantile(latency: dict[int, int], q: float) -> float | None:
    """The upper bound of the bucket holding the ``q`` quantile (None when empty)."""
    total = sum(latency.values())
    if total <= 0:
        return None
    rank, seen = q * total, 0
    for index in sorted(latency):
        seen += latency[index]
        if seen >= rank:
            return BUCKETS[index]
    return BUCKETS[max(latency)]


def merge(summaries: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Add up several instances' summaries (as read from the registry) into one per action.
    Malformed entries (the registry is shared, JSON from anyone) are skipped."""
    counts: dict[str, dict[str, int]] = {}
    latencies: dict[str, dict[int, int]] = {}
    for summary in summaries:
        if not isinstance(summary, dict):
            continue
        for name, entry in summary.items():
            if not isinstance(entry, dict):
                continue
            total = counts.setdefault(str(name), dict.fromkeys(COUNTERS, 0))
            for key, value in entry.items():  # the known counters and any kind added later
                if key != "runs" and isinstance(value, int) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
            buckets = latencies.setdefault(str(name), {})
            for index, runs in (entry.get("latency") or {}).items():
                try:
                    position, number = int(index), int(runs)
                except (TypeError, ValueError):
                    continue
                if 0 <= position < len(BUCKETS):
                    buckets[position] = buckets.get(position, 0) + number
    return {name: _describe(counts[name], latencies[name]) for name in sorted(counts)}


def _describe(counts: dict[str, int], latency: dict[int, int]) -> dict[str, Any]:
    return {**counts, "runs": sum(latency.values()), "p50": quantile(latency, 0.5), "p95": quantile(latency, 0.95),
            "latency": {str(index): runs for index, runs in sorted(latency.items())}}
