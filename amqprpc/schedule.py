"""Periodic tasks: what ``service.periodic(...)`` registers and when each one is due.

A :class:`Schedule` is pure data with pure arithmetic on times, so every beat replica (and
``amqprpc beat --list``) computes the very same tick times: ``every=N`` ticks at the epoch's
multiples of N seconds, ``cron=`` at what croniter says in the schedule's time zone. A tick's
message id is ``{schedule}@{scheduled time ISO 8601}``: the same tick published twice (a
failover between beat replicas) carries the same id, and the worker runs it once.

croniter (``pip install amqprpc[beat]``) is imported only when a cron time is computed: by
the beat, never by a worker that merely imports the service.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

MISFIRE_POLICIES = ("once", "skip")

# Application header of a tick's message: the schedule's name (the worker drops a tick id it
# already ran; see amqprpc.middleware.ticks).
TICK_HEADER = "x-tick"


@dataclass(frozen=True)
class Schedule:
    """Run ``action`` of ``service`` with ``payload`` by ``cron`` (5 fields, in time zone ``tz``)
    or ``every`` seconds. ``misfire``: ticks missed while no beat ran fire once ("once") or
    not at all ("skip")."""

    name: str
    service: str
    action: str
    cron: str | None = None
    every: float | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    tz: str = "UTC"
    misfire: str = "once"

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"schedule {self.name!r}: give cron or every (exactly one)")
        if self.every is not None and not (isinstance(self.every, (int, float)) and math.isfinite(self.every)
                                           and self.every > 0):
            raise ValueError(f"schedule {self.name!r}: every must be a number of seconds > 0, not {self.every!r}")
        if self.cron is not None and len(self.cron.split()) not in (5, 6):
            raise ValueError(f"schedule {self.name!r}: cron must have 5 fields (minute hour day month weekday), "
                             f"not {self.cron!r}")
        if self.misfire not in MISFIRE_POLICIES:
            raise ValueError(f"schedule {self.name!r}: misfire must be 'once' or 'skip', not {self.misfire!r}")
        ZoneInfo(self.tz)  # an unknown zone fails at registration
        if "@" in self.name:
            raise ValueError(f"schedule name {self.name!r} may not contain '@' (it separates a tick id's time)")

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after ``moment`` (aware), in UTC."""
        if self.every is not None:
            now = moment.timestamp()
            tick = (math.floor(now / self.every) + 1) * self.every
            return datetime.fromtimestamp(tick, timezone.utc)
        from croniter import croniter  # the beat's optional dependency: imported only here

        local = moment.astimezone(self.zone)
        found = croniter(str(self.cron), local).get_next(datetime)
        assert isinstance(found, datetime)
        return found.astimezone(timezone.utc)

    def latest_until(self, moment: datetime) -> datetime:
        """The last tick at or before ``moment`` (aware), in UTC: without walking every tick
        of a long outage."""
        if self.every is not None:
            tick = math.floor(moment.timestamp() / self.every) * self.every
            return datetime.fromtimestamp(tick, timezone.utc)
        from croniter import croniter

        local = (moment + timedelta(microseconds=1)).astimezone(self.zone)
        found = croniter(str(self.cron), local).get_prev(datetime)
        assert isinstance(found, datetime)
        return found.astimezone(timezone.utc)

    def due_between(self, after: datetime, until: datetime, limit: int = 1000) -> list[datetime]:
        """The ticks in (``after``, ``until``], oldest first, at most ``limit``."""
        ticks: list[datetime] = []
        tick = self.next_after(after)
        while tick <= until and len(ticks) < limit:
            ticks.append(tick)
            tick = self.next_after(tick)
        return ticks

    def tick_id(self, at: datetime) -> str:
        """``{name}@{scheduled time}``: the message id of the tick at ``at``."""
        return f"{self.name}@{at.astimezone(timezone.utc).isoformat(timespec='milliseconds')}"

    def check(self) -> None:
        """Raise ValueError if the cron expression does not parse (needs croniter)."""
        if self.cron is not None:
            from croniter import croniter

            if not croniter.is_valid(self.cron):
                raise ValueError(f"schedule {self.name!r}: {self.cron!r} is not a valid cron expression")
