"""The ``worker`` command's options of time limits and worker processes (#23): ``--time-limit``,
``--hard-time-limit``, ``--max-abandoned``, ``--processes``, ``--max-tasks-per-child``,
``--max-memory-per-child`` (what they do: :mod:`amqprpc.ops.taskcontrol`).

Its own module (used by :mod:`amqprpc.cli`), importing nothing of ``amqprpc.cli``.
"""
from __future__ import annotations

from typing import Any, Callable

import click


def task_control_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``worker`` options of time limits and worker processes (#23), passed on as ``control``."""
    options = [
        ("--time-limit", dict(default=None, type=click.FloatRange(min=0.001, min_open=False), metavar="SECONDS",
                              help="Default time limit of every handler without its own time_limit=: "
                                   "TimeLimitExceeded is raised inside it (then its retry policy applies).")),
        ("--hard-time-limit", dict(default=10.0, show_default=True, type=click.FloatRange(min=0), metavar="SECONDS",
                                   help="Grace after the time limit before a handler that ignores it is "
                                        "abandoned: its message dead-lettered, its thread replaced (its process, "
                                        "with --processes).")),
        ("--max-abandoned", dict(default=3, show_default=True, type=click.IntRange(min=0),
                                 help="Abandoned handler threads a worker takes before it exits 1 for its "
                                      "supervisor to restart it.")),
        ("--processes", dict(default=0, show_default=True, type=click.IntRange(min=0),
                             help="Child worker processes under one parent (each with --concurrency threads), "
                                  "for CPU-bound handlers; 0: this process is the worker.")),
        ("--max-tasks-per-child", dict(default=None, type=click.IntRange(min=1), metavar="N",
                                       help="With --processes: recycle a child warmly after N deliveries.")),
        ("--max-memory-per-child", dict(default=None, type=click.FloatRange(min=1), metavar="MB",
                                        help="With --processes: recycle a child warmly above this resident memory.")),
    ]
    for name, settings in reversed(options):
        envvar = "AMQPRPC_" + name.lstrip("-").replace("-", "_").upper()
        fn = click.option(name, envvar=envvar, show_envvar=True, **settings)(fn)  # type: ignore[arg-type]
    return fn
