"""What the dashboard shows, gathered into one JSON-able snapshot by one background thread.

Every ``interval`` seconds (1 s by default) the :class:`Collector` reads the service
registry (instances, their heartbeats and per-action summaries), the queue depths (see
:mod:`~amqprpc.dashboard.queues`) and the circuit breakers' Redis hashes, and keeps the
result; every page and API call reads that one snapshot, so ten open browsers cost the
broker and Redis what one does. A source that cannot be reached (Redis down, broker
restarting) leaves its part empty with an ``errors`` entry saying why (credentials
redacted); the others still update, and the collector retries on the next poll.

Stale instances (no heartbeat for ``stale_after`` seconds, 15 by default: three missed
5 s beats) are shown marked until the registry prunes them (60 s). Services once seen stay
listed for the dashboard's lifetime, so the queue of a service whose every worker died
is still watched.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

from amqprpc import logs
from amqprpc.client.breaker import DEFAULT_PREFIX as BREAKER_PREFIX
from amqprpc.config import redact
from amqprpc.dashboard.queues import QueueSource
from amqprpc.ops import actionstats
from amqprpc.ops.registry import Registry
from amqprpc.wire.ids import text

log = logs.get_logger("amqprpc.dashboard")

DEFAULT_STALE_AFTER = 15.0
Snapshot = dict[str, Any]


def read_services(registry: Registry, stale_after: float, now: float) -> list[dict[str, Any]]:
    """Every service of the registry with all its not-yet-pruned instances, stale ones marked."""
    services = []
    for name in registry.services():
        instances: list[dict[str, Any]] = []
        for raw in registry.redis.hvals(registry.key(name)):
            try:
                entry = json.loads(raw)
                beat = float(entry["heartbeat_at"])
            except (ValueError, TypeError, KeyError):
                continue
            if not isinstance(entry, dict):
                continue
            age = max(now - beat, 0.0)
            started = entry.get("started_at")
            instances.append({
                "instance_id": str(entry.get("instance_id", "")), "host": entry.get("host"), "pid": entry.get("pid"),
                "version": entry.get("version"), "amqprpc_version": entry.get("amqprpc_version"),
                "concurrency": entry.get("concurrency"), "started_at": started,
                "uptime": round(now - float(started), 1) if isinstance(started, (int, float)) else None,
                "heartbeat_at": beat, "heartbeat_age": round(age, 1), "stale": age > stale_after,
                "stats": entry.get("stats") if isinstance(entry.get("stats"), dict) else {},
                "actions": entry.get("actions") if isinstance(entry.get("actions"), dict) else {},
            })
        instances.sort(key=lambda entry: (entry["stale"], entry["instance_id"]))
        services.append({"name": name, "live": sum(not entry["stale"] for entry in instances),
                         "instances": instances})
    return services


def action_rows(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (service, action): the live instances' summaries added up."""
    rows = []
    for service in services:
        merged = actionstats.merge([entry["actions"] for entry in service["instances"] if not entry["stale"]])
        for action, summary in merged.items():
            rows.append({"service": service["name"], "action": action,
                         **{key: value for key, value in summary.items() if key != "latency"}})
    return rows


def read_breakers(registry: Registry, prefix: str, now: float) -> list[dict[str, Any]]:
    """Every circuit breaker kept in Redis (``{prefix}:{name}`` hashes, see client.breaker)."""
    breakers = []
    redis = registry.redis
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + ":*"
    for key in sorted(redis.scan_iter(match=pattern, count=500)):
        fields = {text(k): text(v) for k, v in redis.hgetall(key).items()}
        opened = _number(fields.get("opened_at"))
        state = fields.get("state") or "closed"
        breakers.append({
            "name": text(key)[len(prefix) + 1:], "state": state, "failures": int(_number(fields.get("failures")) or 0),
            "opened_at": opened / 1000.0 if opened else None,
            "open_for": round(now - opened / 1000.0, 1) if opened and state != "closed" else None,
        })
    return breakers


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Collector:
    """The background thread that refreshes the snapshot; :meth:`snapshot` reads it,
    :meth:`wait_newer` blocks until a newer one (for the server-sent event stream)."""

    def __init__(self, registry: Registry, queues: QueueSource, *, interval: float = 1.0,
                 stale_after: float = DEFAULT_STALE_AFTER, breaker_prefix: str = BREAKER_PREFIX,
                 extensions: dict[str, Callable[[], Any]] | None = None):
        self.registry = registry
        self.queues = queues
        self.interval = interval
        self.stale_after = stale_after
        self.breaker_prefix = breaker_prefix
        # Name -> callable returning JSON-able data, added to every snapshot under that name:
        # where periodic schedules (and revocations) plug in once those features exist.
        self.extensions = dict(extensions or {})
        self.known: set[str] = set()
        self._snapshot: Snapshot = {"at": 0.0, "version": 0, "services": [], "queues": [], "actions": [],
                                    "breakers": [], "dead_letters": {}, "errors": {}, "queue_source": queues.source}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: set[str] = set()

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="amqprpc-dashboard-collector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(5)
        self.queues.close()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the page keeps its last snapshot; next poll retries
                log.exception("dashboard refresh failed")

    def snapshot(self) -> Snapshot:
        with self._changed:
            return self._snapshot

    def wait_newer(self, version: int, timeout: float) -> Snapshot:
        """The snapshot once its version is past ``version`` (or the current one after ``timeout``)."""
        with self._changed:
            self._changed.wait_for(lambda: self._snapshot["version"] > version or self._stop.is_set(), timeout)
            return self._snapshot

    def refresh(self) -> Snapshot:
        now = time.time()
        errors: dict[str, str] = {}
        services: list[dict[str, Any]] = []
        breakers: list[dict[str, Any]] = []
        try:
            services = read_services(self.registry, self.stale_after, now)
            breakers = read_breakers(self.registry, self.breaker_prefix, now)
        except Exception as exc:  # noqa: BLE001 - shown on the page, retried next poll
            errors["redis"] = self._failed("redis", exc)
        else:
            self._recovered("redis")
        self.known.update(service["name"] for service in services)
        queues: list[dict[str, Any]] = []
        try:
            queues = self.queues.queues(sorted(self.known))
        except Exception as exc:  # noqa: BLE001
            errors["broker"] = self._failed("broker", exc)
        else:
            self._recovered("broker")
        listed = {service["name"] for service in services}
        services += [{"name": name, "live": 0, "instances": []} for name in sorted(self.known - listed)]
        services.sort(key=lambda service: service["name"])
        extra: dict[str, Any] = {}
        for name, read in self.extensions.items():
            try:
                extra[name] = read()
            except Exception as exc:  # noqa: BLE001
                errors[name] = self._failed(name, exc)
        actions = action_rows(services)
        for service in services:  # the per-instance sketches are summed up in actions: not sent again
            for entry in service["instances"]:
                entry.pop("actions", None)
        with self._changed:
            snapshot: Snapshot = {
                "at": round(now, 3), "version": self._snapshot["version"] + 1, "services": services,
                "queues": queues, "actions": actions, "breakers": breakers,
                "dead_letters": {row["service"]: row["ready"] for row in queues if row["kind"] == "dead"},
                "errors": errors, "queue_source": self.queues.source, **extra,
            }
            self._snapshot = snapshot
            self._changed.notify_all()
        return snapshot

    def _failed(self, what: str, exc: BaseException) -> str:
        message = redact(f"{type(exc).__name__}: {exc}")
        if what not in self._failing:
            self._failing.add(what)
            log.warning("dashboard source unreachable; retrying every poll", source=what, error=message)
        return message

    def _recovered(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.info("dashboard source reachable again", source=what)
