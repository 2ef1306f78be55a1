"""What ``amqprpc worker``'s time-limit and process options add to a worker process (#23).

- ``--time-limit`` (the default of every handler) / a handler's own ``time_limit=``: the
  worker gets a :class:`~amqprpc.middleware.timelimit.TimeLimit` (only when some limit is
  set: an unused feature costs nothing);
- a handler that ignores its limit past ``--hard-time-limit`` is abandoned: the worker writes
  its thread off (its message dead-lettered with the reason, a new thread in its place).
  In a plain worker, more than ``--max-abandoned`` of them make it exit 1 for its supervisor
  to restart it (every written-off thread still holds whatever it is stuck in); in a
  ``--processes`` child the first one has the child recycled by its parent;
- ``--processes N``: :class:`~amqprpc.ops.prefork.Prefork` runs N children; one silent for
  ``AMQPRPC_CHILD_STALL_TIMEOUT`` seconds (60: its whole interpreter stuck, e.g. C code that
  holds the GIL) is killed and replaced.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from amqprpc import logs
from amqprpc.middleware import Middleware
from amqprpc.middleware.timelimit import TimeLimit
from amqprpc.ops import daemon
from amqprpc.ops.child import ChildLink
from amqprpc.ops.prefork import Prefork
from amqprpc.service import Service

log = logs.get_logger("amqprpc.taskcontrol")


def worker_middleware(service: Service, control: dict[str, Any], child: ChildLink | None) -> list[Middleware]:
    """The middleware ``control`` (the worker command's options) asks of a worker of
    ``service``; ``child`` when it is a ``--processes`` child."""
    found: list[Middleware] = []
    if child is not None:
        found.append(child)
    default = control.get("time_limit")
    if default is not None or service.uses_time_limits:
        found.append(time_limit_middleware(default, control.get("hard_time_limit", 10.0),
                                           control.get("max_abandoned", 3), child))
    return found


def time_limit_middleware(default: float | None, hard_grace: float, max_abandoned: int,
                          child: ChildLink | None = None) -> TimeLimit:
    """A TimeLimit whose abandoned handlers end this process's service when too many (see
    the module doc)."""
    if child is not None:
        def give_up() -> None:
            child.recycle("abandoned-handler")
        return TimeLimit(default, hard_grace=hard_grace, max_abandoned=0, on_too_many=give_up)

    def exit_1() -> None:
        daemon.request_exit(daemon.EXIT_COLD_STOP, f"more than {max_abandoned} abandoned handler threads")
    return TimeLimit(default, hard_grace=hard_grace, max_abandoned=max_abandoned, on_too_many=exit_1)


def metrics_port_of(port: int | None, child: ChildLink | None) -> int | None:
    """``--metrics-port P``: P for a plain worker, P+K for child K of ``--processes``."""
    return None if port is None else port + (child.slot if child is not None else 0)


def title_of(service: str, child: ChildLink | None) -> str | None:
    """The process title of a child (a plain worker keeps run_worker's default)."""
    return None if child is None else f"amqprpc worker {service} child {child.slot + 1}/{child.processes}"


def run_processes(serve: Callable[[ChildLink], int], service: str, control: dict[str, Any],
                  shutdown_timeout: float, pidfile: str | None) -> int:
    """``--processes N``: the parent, until its children stopped; its exit code."""
    parent = Prefork(serve, control["processes"], name=service,
                     max_tasks_per_child=control.get("max_tasks_per_child"),
                     max_memory_mb=control.get("max_memory_per_child"), shutdown_timeout=shutdown_timeout,
                     stall_timeout=float(os.environ.get("AMQPRPC_CHILD_STALL_TIMEOUT") or 60.0))
    return parent.run(pidfile=pidfile)
