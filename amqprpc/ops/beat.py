"""``amqprpc beat``: publishes the ticks of services' periodic tasks, any number of replicas.

Celery beat is a single point of failure: one dead beat fires nothing, two fire everything
twice. Here every replica runs the same loop, and one of them -- the holder of a Redis
*lease* per service (``SET key me NX PX ttl``, renewed by a compare-and-extend Lua script) --
publishes. A killed leader's lease runs out after ``lease_ttl`` seconds and another replica
takes over at its next poll, so ticks keep coming within max(5 s, one interval).

Exactly once, across failovers:

- each tick is a cast whose message id is ``{schedule}@{scheduled time}`` (:class:`Schedule`),
  with an ``x-tick`` header; workers drop a tick id they already ran
  (:mod:`amqprpc.middleware.ticks`), so a tick published twice -- by a leader that published,
  then died before recording it -- runs once;
- the last tick fired per schedule is recorded in Redis (only by the lease holder, atomically
  with checking the lease), so a new leader goes on from there: missed ticks younger than
  ``catch_up`` seconds (a failover) are each fired; older ones (no beat ran at all) fire as one
  run (``misfire="once"``) or not at all (``"skip"``). A schedule seen for the first time
  starts from now.

Redis down: no replica can hold the lease, so none publishes (never all of them); ticks
missed meanwhile then follow ``misfire``. Broker down: the leader keeps the lease and
publishes the due ticks once the broker is back (same ids).
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Sequence

from amqprpc import logs
from amqprpc.config import broker_url as default_broker_url
from amqprpc.config import redact, redis_client
from amqprpc.config import redis_url as default_redis_url
from amqprpc.errors import CallTimeout, ConnectionLost, PublishRefused, RpcError, ServiceUnavailable, StartCancelled
from amqprpc.schedule import TICK_HEADER, Schedule
from amqprpc.service import Service
from amqprpc.transport.backoff import full_jitter
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology

log = logs.get_logger("amqprpc.beat")

DEFAULT_PREFIX = "amqprpc:beat"
ANNOUNCE_EVERY_S = 2.0  # how often a leading replica writes its schedules' next runs (for the dashboard)

# Extend the lease only while we still hold it (another replica may have taken an expired one).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# Record a fired tick only while holding the lease: a deposed leader cannot move it.
_FIRED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Beat:
    """Publish the ticks of ``services``' schedules while this replica leads.

    Parameters: ``broker_url``, ``redis_url`` (defaults from the environment); ``prefix`` of
    its Redis keys; ``lease_ttl`` seconds a leader that stopped renewing keeps the lease;
    ``poll`` seconds between looks at the clock (how late a tick may be published);
    ``catch_up`` seconds: missed ticks younger than this are each fired (default
    ``max(10, 3 * lease_ttl)``); ``topology`` as for clients. Has a worker's lifecycle
    (:class:`amqprpc.ops.daemon.Daemon`), so ``amqprpc beat`` runs it as one.
    """

    def __init__(self, services: Sequence[Service], *, broker_url: str | None = None, redis_url: str | None = None,
                 prefix: str = DEFAULT_PREFIX, lease_ttl: float = 3.0, poll: float = 0.2,
                 catch_up: float | None = None, topology: Topology = DEFAULT_TOPOLOGY,
                 reconnect_cap: float = 10.0) -> None:
        self.services = list(services)
        self.url = default_broker_url(broker_url)
        self.redis_url = default_redis_url(redis_url)
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self.poll = poll
        self.catch_up = max(10.0, 3 * lease_ttl) if catch_up is None else catch_up
        self.topology = topology
        self.reconnect_cap = reconnect_cap
        self.instance = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}"
        self.redis: Any = redis_client(self.redis_url, 1.0)
        self._renew = self.redis.register_script(_RENEW)
        self._fired = self.redis.register_script(_FIRED)
        self._release = self.redis.register_script(_RELEASE)
        self.leading: set[str] = set()  # services whose lease this replica holds
        self._client: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._redis_down = False
        self._announced = 0.0  # monotonic: when the schedules were last written for the dashboard
        self.stats_counts = {"published": 0, "caught_up": 0, "misfires": 0, "leaderships": 0, "publish_errors": 0}

    # --- the Daemon protocol ---------------------------------------------------------
    @property
    def name(self) -> str:
        return "+".join(service.name for service in self.services)

    @property
    def stats(self) -> dict[str, int]:
        return {**self.stats_counts, "leading": len(self.leading)}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, *, broker_wait: float = 0.0,
              on_connect_retry: Callable[[int, float, BaseException], None] | None = None) -> None:
        """Check every schedule (a bad cron expression raises ValueError), connect to the
        broker (waiting up to ``broker_wait`` seconds, as a worker does), start the loop."""
        for service in self.services:
            for schedule in service.schedules.values():
                schedule.check()
            if not service.schedules:
                log.warning("service has no schedules (service.periodic): nothing to publish for it",
                            service=service.name)
        from amqprpc.client.rpc import RpcClient

        deadline = time.monotonic() + broker_wait
        attempt = 0
        while True:
            try:
                self._client = RpcClient(f"amqprpc-beat-{self.name}", broker_url=self.url, topology=self.topology,
                                         reconnect_cap=self.reconnect_cap)
                break
            except ServiceUnavailable as exc:
                retry_in = max(0.1, full_jitter(attempt, 0.5, self.reconnect_cap))
                if time.monotonic() + retry_in > deadline:
                    raise
                attempt += 1
                if on_connect_retry is not None:
                    on_connect_retry(attempt, retry_in, exc)
                log.warning("broker connect failed", attempt=attempt, retry_in=round(retry_in, 2),
                            error=redact(str(exc)))
                if self._cancel.wait(retry_in):
                    raise StartCancelled() from None
        self._thread = threading.Thread(target=self._run, name="amqprpc-beat", daemon=True)
        self._thread.start()
        log.info("beat ready", services=[s.name for s in self.services], instance=self.instance,
                 schedules=[name for s in self.services for name in s.schedules])

    def cancel_start(self) -> None:
        self._cancel.set()

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop publishing, give the leases up (another replica takes over at once), close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for service in list(self.leading):
            try:
                self._release(keys=[self._key(service, "leader")], args=[self.instance])
            except Exception:  # noqa: BLE001 - Redis down: the lease runs out by itself
                pass
        self.leading.clear()
        if self._client is not None:
            self._client.close()
        log.info("beat stopped", **self.stats)
        return True

    def stop(self, timeout: float | None = 10.0) -> None:
        self.shutdown(timeout or 0.0)

    # --- the loop ----------------------------------------------------------------------
    def _key(self, service: str, *parts: str) -> str:
        return ":".join((self.prefix, service, *parts))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.poll)

    def tick(self) -> None:
        """One look at the clock: hold the leases, publish what is due where this replica leads."""
        try:
            for service in self.services:
                if service.schedules and self._lead(service.name):
                    for schedule in service.schedules.values():
                        self._fire_due(schedule)
            if self.leading and time.monotonic() - self._announced >= ANNOUNCE_EVERY_S:
                self._announce()
            if self._redis_down:
                log.info("Redis reachable again: beat leader election resumes")
                self._redis_down = False
        except Exception as exc:  # noqa: BLE001 - Redis errors: nobody leads until it is back
            if not self._redis_down:
                log.warning("Redis unreachable: this beat replica publishes nothing until it is back",
                            error=redact(str(exc)))
                self._redis_down = True
            self.leading.clear()

    def _announce(self) -> None:
        """Write what the schedules this replica leads run next, for ``amqprpc dashboard``
        (:func:`announced_schedules`): one hash, kept a minute after the last leader wrote it."""
        now = datetime.now(timezone.utc)
        rows = {f"{service.name}/{schedule.name}": json.dumps({
                    "name": schedule.name, "service": service.name, "action": schedule.action,
                    "next_run": schedule.next_after(now).isoformat()})
                for service in self.services if service.name in self.leading
                for schedule in service.schedules.values()}
        if rows:
            key = ":".join((self.prefix, "schedules"))
            pipe = self.redis.pipeline()
            pipe.hset(key, mapping=rows)
            pipe.expire(key, 60)
            pipe.execute()
        self._announced = time.monotonic()

    def _lead(self, service: str) -> bool:
        """Hold (acquire or renew) the lease of ``service``; whether this replica leads it."""
        key, ttl_ms = self._key(service, "leader"), int(self.lease_ttl * 1000)
        if service in self.leading:
            if self._renew(keys=[key], args=[self.instance, ttl_ms]):
                return True
            self.leading.discard(service)
            log.warning("beat lease lost", service=service)
        if self.redis.set(key, self.instance, nx=True, px=ttl_ms):
            self.leading.add(service)
            self.stats_counts["leaderships"] += 1
            log.info("beat leads", service=service, instance=self.instance)
            return True
        return False

    def _fire_due(self, schedule: Schedule) -> None:
        last_key = self._key(schedule.service, schedule.name, "last")
        now = datetime.now(timezone.utc)
        raw = self.redis.get(last_key)
        if raw is None:  # a new schedule starts from now
            self._fired(keys=[self._key(schedule.service, "leader"), last_key], args=[self.instance, now.timestamp()])
            return
        last = datetime.fromtimestamp(float(raw), timezone.utc)
        first = schedule.next_after(last)
        if first > now:
            return
        # Ticks older than catch_up were missed while no beat ran: one run for all of them
        # ("once") or none ("skip"), found without walking each one of a long outage.
        cut = now - timedelta(seconds=self.catch_up)
        missed = schedule.latest_until(cut) if first <= cut else None
        recent = schedule.due_between(max(last, cut), now)
        fire = recent
        if missed is not None:
            self.stats_counts["misfires"] += 1
            if schedule.misfire == "once":
                fire = [missed, *recent]
            log.warning("ticks missed while no beat ran", schedule=schedule.name, since=first.isoformat(),
                        until=missed.isoformat(), misfire=schedule.misfire)
        if not fire:
            self._fired(keys=[self._key(schedule.service, "leader"), last_key],
                        args=[self.instance, (missed or now).timestamp()])
            return
        self.stats_counts["caught_up"] += max(0, len(recent) - 1)
        for tick in fire:
            if not self._publish(schedule, tick):
                return  # the broker: the same tick (same id) goes again at the next poll
            if not self._fired(keys=[self._key(schedule.service, "leader"), last_key],
                               args=[self.instance, tick.timestamp()]):
                self.leading.discard(schedule.service)
                log.warning("beat lease lost while publishing", schedule=schedule.name)
                return

    def _publish(self, schedule: Schedule, tick: datetime) -> bool:
        tick_id = schedule.tick_id(tick)
        try:
            # Well within the lease: a publish that hangs must not outlive this replica's lead.
            self._client.cast(schedule.service, schedule.action, schedule.payload, message_id=tick_id,
                              headers={TICK_HEADER: schedule.name}, timeout=self.lease_ttl / 3)
        except (ConnectionLost, PublishRefused, CallTimeout) as exc:
            self.stats_counts["publish_errors"] += 1
            log.warning("tick not published yet (broker)", tick=tick_id, error=redact(str(exc)))
            return False
        except ServiceUnavailable as exc:
            # No request queue (service never deployed): counted as fired, or it would be retried
            # forever; the next tick tries again.
            self.stats_counts["publish_errors"] += 1
            log.error("tick not delivered: no queue for its service", tick=tick_id, error=str(exc))
            return True
        except RpcError as exc:
            self.stats_counts["publish_errors"] += 1
            log.warning("tick not published yet (broker)", tick=tick_id, error=redact(str(exc)))
            return False
        self.stats_counts["published"] += 1
        log.info("tick published", tick=tick_id, service=schedule.service, action=schedule.action)
        return True


def describe_schedules(services: Sequence[Service], redis_url: str | None = None,
                       prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """What ``amqprpc beat --list`` prints: each schedule, its next run and (when Redis answers)
    its last fired tick."""
    now = datetime.now(timezone.utc)
    last: dict[str, float | None] = {}
    try:
        redis = redis_client(default_redis_url(redis_url), 1.0)
        for service in services:
            for schedule in service.schedules.values():
                raw = redis.get(":".join((prefix, service.name, schedule.name, "last")))
                last[f"{service.name}/{schedule.name}"] = float(raw) if raw is not None else None
    except Exception:  # noqa: BLE001 - --list works without Redis, without the last runs
        pass
    rows = []
    for service in services:
        for schedule in service.schedules.values():
            schedule.check()
            fired = last.get(f"{service.name}/{schedule.name}")
            rows.append({
                "service": service.name, "schedule": schedule.name, "action": schedule.action,
                "when": f"cron {schedule.cron} ({schedule.tz})" if schedule.cron else f"every {schedule.every:g}s",
                "misfire": schedule.misfire, "next": schedule.next_after(now).isoformat(),
                "last": None if fired is None or math.isnan(fired)
                else datetime.fromtimestamp(fired, timezone.utc).isoformat()})
    return rows


def announced_schedules(redis: Any, prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """The schedules the running beat replicas lead and their next runs (what ``amqprpc
    dashboard`` shows): ``[{name, service, action, next_run}]``, by service and name."""
    rows = [json.loads(value) for value in redis.hgetall(":".join((prefix, "schedules"))).values()]
    return sorted(rows, key=lambda row: (row["service"], row["name"]))
