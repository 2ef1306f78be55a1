"""The service registry: which worker instances are alive, kept in Redis with heartbeats.

Each service has one hash ``{prefix}:{service}`` (``service:registry:user-service`` by
default, as the seed article has it) mapping instance id -> a JSON object: instance id,
service, host, pid, start time, concurrency, version, the worker's counters, its per-action
outcome counts and latency sketch (``actions``, see :mod:`amqprpc.ops.actionstats`: at most
50 actions, a few KB) and ``heartbeat_at`` (epoch seconds). A worker's :class:`Presence` thread writes its entry every
``interval`` seconds and deletes it on a graceful stop; an instance that died without
stopping (kill -9, lost host) stops heartbeating, and readers ignore and prune entries older
than ``stale_after`` seconds (60 by default).

Redis is never on a worker's request path: the heartbeat runs in its own thread, and while
Redis is unreachable it logs one warning and retries each interval. A worker never fails
because of the registry.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Callable

from amqprpc import logs
from amqprpc.config import redact, redis_client
from amqprpc.config import redis_url as default_redis_url
from amqprpc.ops.actionstats import ActionStats
from amqprpc.outcome import Outcome
from amqprpc.wire.ids import new_instance_id, text
from amqprpc.middleware import Delivery, Middleware
from amqprpc.version import __version__
from amqprpc.middleware.view import WorkerView

log = logs.get_logger("amqprpc.registry")

DEFAULT_PREFIX = "service:registry"
DEFAULT_STALE_AFTER = 60.0
DEFAULT_INTERVAL = 5.0
DEFAULT_MAX_ACTIONS = 50  # actions per service whose stats ride in the heartbeat (the rest: "(other)")

# Delete, atomically, the entries whose heartbeat is older than ARGV[1] (epoch seconds):
# a reader that checked "stale" and then deleted could remove an entry that heartbeated in between.
_PRUNE = """
local removed = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local ok, doc = pcall(cjson.decode, entries[i + 1])
  if not ok or type(doc) ~= 'table' or tonumber(doc['heartbeat_at'] or 0) < tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], entries[i])
    removed = removed + 1
  end
end
return removed
"""


def registry_prefix(prefix: str | None = None) -> str:
    """The key prefix: the argument, else ``AMQPRPC_REGISTRY_PREFIX``, else ``service:registry``."""
    return prefix or os.environ.get("AMQPRPC_REGISTRY_PREFIX") or DEFAULT_PREFIX


__all__ = ["Registry", "Presence", "Heartbeat", "describe_worker", "format_table", "new_instance_id",
           "registry_prefix"]


class Registry:
    """Reads and writes the registry.

    Parameters: ``redis_url`` (default ``AMQPRPC_REDIS_URL``); ``prefix`` of the keys;
    ``stale_after`` seconds without a heartbeat after which an instance counts as dead;
    ``timeout`` seconds for each Redis round trip.
    """

    def __init__(self, redis_url: str | None = None, *, prefix: str | None = None,
                 stale_after: float = DEFAULT_STALE_AFTER, timeout: float = 1.0):
        self.url = default_redis_url(redis_url)
        self.prefix = registry_prefix(prefix)
        self.stale_after = stale_after
        self.redis = redis_client(self.url, timeout)
        self._prune = self.redis.register_script(_PRUNE)

    def presence(self, interval: float = DEFAULT_INTERVAL) -> Presence:
        """The middleware that keeps a worker announced here (see :class:`Presence`)."""
        return Presence(self, interval)

    def key(self, service: str) -> str:
        return f"{self.prefix}:{service}"

    def announce(self, entry: dict[str, Any]) -> None:
        """Write (or refresh) one instance's entry; ``heartbeat_at`` is set to now. The key
        expires if every instance of the service stops heartbeating, so dead services vanish."""
        entry = {**entry, "heartbeat_at": round(time.time(), 3)}
        key = self.key(entry["service"])
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, entry["instance_id"], json.dumps(entry, separators=(",", ":")))
        pipe.expire(key, max(int(self.stale_after * 2), 10))
        pipe.execute()

    def withdraw(self, service: str, instance_id: str) -> None:
        self.redis.hdel(self.key(service), instance_id)

    def prune(self, service: str) -> int:
        """Delete the service's stale entries; returns how many."""
        return int(self._prune(keys=[self.key(service)], args=[time.time() - self.stale_after]))

    def services(self) -> list[str]:
        """Names of the services with any entry (live or not yet pruned)."""
        start = len(self.prefix) + 1
        names = {text(key)[start:] for key in self.redis.scan_iter(match=f"{_escape(self.prefix)}:*", count=500)}
        return sorted(names)

    def instances(self, service: str, prune: bool = True) -> list[dict[str, Any]]:
        """The live instances of ``service``, each entry with ``heartbeat_age`` (seconds)
        added; stale entries are left out (and deleted when ``prune``)."""
        now = time.time()
        live, stale = [], 0
        for raw in self.redis.hvals(self.key(service)):
            try:
                entry = json.loads(raw)
                age = now - float(entry["heartbeat_at"])
            except (ValueError, TypeError, KeyError):
                stale += 1
                continue
            if age > self.stale_after:
                stale += 1
                continue
            entry["heartbeat_age"] = round(max(age, 0.0), 3)
            live.append(entry)
        if stale and prune:
            self.prune(service)
        return sorted(live, key=lambda entry: entry["instance_id"])

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Every service with at least one live instance -> its live instances."""
        found = {name: self.instances(name) for name in self.services()}
        return {name: entries for name, entries in found.items() if entries}


class Presence(Middleware):
    """A worker's presence in the registry, as a middleware: announced from its own
    :class:`Heartbeat` thread once the worker consumes, withdrawn as soon as it stops
    consuming. ``Worker(..., registry=r)`` adds one; ``amqprpc worker`` does unless
    ``--registry-interval 0``.

    It also counts every delivery's outcome per action (:class:`~amqprpc.ops.actionstats.ActionStats`:
    counters and a latency sketch, bounded to ``max_actions`` names) and sends that summary
    with each heartbeat as ``actions``: what ``amqprpc dashboard`` shows per action."""

    def __init__(self, registry: Registry, interval: float = DEFAULT_INTERVAL,
                 max_actions: int = DEFAULT_MAX_ACTIONS):
        self.registry = registry
        self.interval = interval
        self.max_actions = max_actions
        self._heartbeats: dict[int, Heartbeat] = {}  # id(worker) -> its thread (one middleware, any workers)
        self._actions: dict[str, ActionStats] = {}  # service -> its per-action stats

    def actions(self, service: str) -> ActionStats:
        """The per-action stats of ``service``'s deliveries through this middleware."""
        stats = self._actions.get(service)
        if stats is None:
            stats = self._actions.setdefault(service, ActionStats(self.max_actions))
        return stats

    def after_handle(self, delivery: Delivery, outcome: Outcome) -> None:
        self.actions(delivery.service).record(delivery.handler or delivery.action, outcome)

    def outcome_amended(self, delivery: Delivery, old: Outcome, new: Outcome) -> None:
        self.actions(delivery.service).amend(delivery.handler or delivery.action, old, new)

    def worker_started(self, worker: WorkerView) -> None:
        actions = self.actions(worker.service.name)
        heartbeat = Heartbeat(self.registry, lambda: {**describe_worker(worker), "actions": actions.summary()},
                              self.interval)
        self._heartbeats[id(worker)] = heartbeat
        heartbeat.start()

    def worker_stopping(self, worker: WorkerView) -> None:
        heartbeat = self._heartbeats.pop(id(worker), None)
        if heartbeat is not None:
            heartbeat.stop()  # stop advertising as soon as it stops consuming


class Heartbeat:
    """A worker's heartbeat thread: announces ``describe()`` every ``interval`` seconds,
    withdraws it on :meth:`stop`. Never raises because of Redis."""

    def __init__(self, registry: Registry, describe: Callable[[], dict[str, Any]], interval: float = DEFAULT_INTERVAL):
        self.registry = registry
        self.describe = describe
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._healthy = True
        entry = describe()
        self.service, self.instance_id = entry["service"], entry["instance_id"]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"amqprpc-registry-{self.service}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop heartbeating and remove this instance's entry (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._attempt("deregister", lambda: self.registry.withdraw(self.service, self.instance_id))

    def _run(self) -> None:
        beats = 0
        while True:
            if self._attempt("heartbeat", lambda: self.registry.announce(self.describe())) and beats % 12 == 0:
                # Now and then, clear the entries of instances of this service that died unannounced.
                self._attempt("prune", lambda: self.registry.prune(self.service))
            beats += 1
            if self._stop.wait(self.interval):
                return

    def _attempt(self, what: str, fn: Callable[[], Any]) -> bool:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the registry must never take the worker down
            if self._healthy:
                self._healthy = False
                log.warning("service registry unreachable; retrying every interval", what=what,
                            url=redact(self.registry.url), error=redact(str(exc)), retry_in=self.interval)
            return False
        if not self._healthy:
            self._healthy = True
            log.info("service registry reachable again", url=redact(self.registry.url))
        return True


def describe_worker(worker: Any) -> dict[str, Any]:
    """A worker's registry entry (without ``heartbeat_at``, which :meth:`Registry.announce` adds).
    A ``--processes`` child's also has ``process``: its slot, its parent's pid and the parent's
    counts (child_restarts, recycled, killed)."""
    from amqprpc.ops.child import current_child

    child = current_child()
    entry = {
        "instance_id": worker.instance_id,
        "service": worker.service.name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": round(worker.started_at, 3),
        "concurrency": worker.concurrency,
        "version": getattr(worker.service, "version", None) or __version__,
        "amqprpc_version": __version__,
        "stats": dict(worker.stats),
    }
    if child is not None:
        entry["process"] = child.describe()
    return entry


def format_table(snapshot: dict[str, list[dict[str, Any]]]) -> str:
    """``amqprpc services`` as a table: one row per live instance."""
    if not snapshot:
        return "no live services"
    header = ("SERVICE", "INSTANCES", "INSTANCE", "HOST", "PID", "HEARTBEAT", "PROCESSED", "FAILED", "UPTIME",
              "PROCESS")
    rows = [header]
    now = time.time()
    for name, entries in sorted(snapshot.items()):
        for index, entry in enumerate(entries):
            stats = entry.get("stats") or {}
            rows.append((
                name if index == 0 else "", str(len(entries)) if index == 0 else "", entry["instance_id"],
                str(entry.get("host", "")), str(entry.get("pid", "")), f"{entry['heartbeat_age']:.1f}s ago",
                str(stats.get("succeeded", 0) + stats.get("failed", 0)), str(stats.get("failed", 0)),
                f"{now - float(entry.get('started_at', now)):.0f}s", _process(entry.get("process")),
            ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _process(process: Any) -> str:
    """A --processes child's column: its slot, its parent and the parent's restarts."""
    if not isinstance(process, dict):
        return ""
    return (f"child {int(process.get('slot', 0)) + 1}/{process.get('processes')} of {process.get('parent_pid')}, "
            f"{process.get('child_restarts', 0)} restarts, {process.get('recycled', 0)} recycled")


def _escape(pattern: str) -> str:
    """Escape glob characters of a literal prefix for SCAN MATCH."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in pattern)
