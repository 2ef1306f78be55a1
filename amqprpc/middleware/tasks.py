"""Which middleware of tasks in time (#22) a service needs: what it does not use costs nothing.

- :class:`~amqprpc.middleware.eta.Eta` for every service: anyone may send a countdown cast to
  any service (a message without ``x-eta`` skips it: its ``consume_gate``);
- :class:`~amqprpc.middleware.ratelimit.RateLimit` when a handler has a ``rate_limit``;
- :class:`~amqprpc.middleware.ticks.TickOnce` when the service has schedules (``periodic``).

Outermost first: an early message waits before it takes a rate-limit slot, and a tick is
claimed only when it is about to run (not when it goes off to wait for its slot).
"""
from __future__ import annotations

from typing import Any

from amqprpc.middleware import Middleware
from amqprpc.middleware.eta import Eta


def tasks_in_time(service: Any) -> list[Middleware]:
    """The middleware ``service`` (a :class:`~amqprpc.service.Service`) needs, outermost first."""
    found: list[Middleware] = [Eta()]
    if service.rate_limits:
        from amqprpc.middleware.ratelimit import RateLimit

        found.append(RateLimit(service))
    if service.schedules:
        from amqprpc.middleware.ticks import TickOnce

        found.append(TickOnce(service.name))
    return found
