"""``amqprpc beat`` and ``amqprpc migrate-queue``: the commands of tasks in time (#22).

:func:`register` adds them to the ``amqprpc`` group, given :mod:`amqprpc.cli` itself for its
shared options and exit codes (passed in rather than imported: the group imports this module).
"""
from __future__ import annotations

import json
import sys
from types import ModuleType
from typing import Any

import click

from amqprpc import logs
from amqprpc.errors import ServiceNotFound


def register(main: click.Group, cli: ModuleType) -> None:
    """Add ``beat`` and ``migrate-queue`` to ``main`` (the group of :mod:`amqprpc.cli`)."""
    global _cli
    _cli = cli
    main.add_command(cli.broker_option(cli.logging_options("info")(cli.redis_option(cli.daemon_options(beat)))))
    main.add_command(cli.broker_option(cli.logging_options("warning")(migrate_queue)))


_cli: Any = None


def _load(names: tuple[str, ...], app: str | None) -> list[Any]:
    from amqprpc.ops.loading import load_service

    if app and len(names) > 1:
        _cli.fail(_cli.EXIT_USAGE, "--app loads one service: name only that one")
    try:
        return [load_service(name, app) for name in names]
    except ServiceNotFound as exc:
        _cli.fail(_cli.EXIT_USAGE, str(exc))
    return []  # pragma: no cover - fail() exits


@click.command()
@click.argument("services", nargs=-1, required=True, metavar="SERVICE...")
@click.option("--app", envvar="AMQPRPC_APP", show_envvar=True, metavar="MODULE:ATTR",
              help="Load the Service from here instead of the entry points / workers package (one SERVICE).")
@click.option("--list", "list_only", is_flag=True, help="Print the schedules and their next runs, then exit.")
@click.option("--json", "as_json", is_flag=True, help="With --list: print JSON.")
@click.option("--lease-ttl", envvar="AMQPRPC_BEAT_LEASE_TTL", default=3.0, show_default=True, show_envvar=True,
              type=click.FloatRange(min=0.5), help="Seconds a dead leader keeps the lease before another "
                                                   "replica takes over.")
def beat(services: tuple[str, ...], app: str | None, list_only: bool, as_json: bool, lease_ttl: float,
         redis_url: str, shutdown_timeout: float, heartbeat: float, reconnect_cap: float, pidfile: str | None,
         broker_wait: float, broker: str, log_format: str, log_level: str) -> None:
    """Publish the periodic tasks of SERVICE... (service.periodic) until a stop signal.

    Run as many replicas as you like: one leads (a Redis lease) and publishes each tick
    once; workers drop a tick they already ran. Signals, exit codes, --broker-wait and
    logging as for 'amqprpc worker'. Needs croniter for cron schedules (amqprpc[beat]).
    """
    logs.configure(log_format, log_level)
    loaded = _load(services, app)
    if list_only:
        from amqprpc.ops.beat import describe_schedules

        try:
            rows = describe_schedules(loaded, redis_url)
        except (ValueError, ImportError) as exc:
            _cli.fail(_cli.EXIT_USAGE, str(exc))
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            click.echo("no schedules")
        for row in rows:
            click.echo(f"{row['service']} {row['schedule']}: {row['action']} {row['when']} misfire={row['misfire']}"
                       f" next={row['next']} last={row['last'] or '-'}")
        return
    from amqprpc.errors import StartupError
    from amqprpc.ops.beat import Beat
    from amqprpc.ops.daemon import run_worker

    logs.bind_process(service="amqprpc-beat")
    instance = Beat(loaded, broker_url=broker, redis_url=redis_url, lease_ttl=lease_ttl, reconnect_cap=reconnect_cap)
    try:
        code = run_worker(instance, shutdown_timeout, pidfile=pidfile, title=f"amqprpc beat {instance.name}",
                          broker_wait=broker_wait, kind="beat")
    except (StartupError, ValueError, ImportError) as exc:
        _cli.fail(_cli.EXIT_USAGE, str(exc))
    except Exception as exc:  # noqa: BLE001 - connection failures at start: one line, no traceback
        _cli.fail(_cli.EXIT_UNAVAILABLE, f"cannot connect to broker {broker}: {exc}")
    sys.exit(code)


@click.command("migrate-queue")
@click.argument("service")
@click.option("--app", envvar="AMQPRPC_APP", show_envvar=True, metavar="MODULE:ATTR",
              help="Load the Service from here instead of the entry points / workers package.")
@click.option("--queue-type", envvar="AMQPRPC_QUEUE_TYPE", default="classic", show_default=True, show_envvar=True,
              type=click.Choice(["classic", "quorum"]), help="As the service's workers run with.")
@click.option("--max-redeliveries", envvar="AMQPRPC_MAX_REDELIVERIES", default=5, show_default=True,
              show_envvar=True, type=click.IntRange(min=0), help="As the service's workers run with.")
def migrate_queue(service: str, app: str | None, queue_type: str, max_redeliveries: int, broker: str,
                  log_format: str, log_level: str) -> None:
    """Re-create SERVICE's request queue with the arguments the service declares now
    (e.g. max_priority), moving its waiting messages over. Stop its workers first.

    Exit 0 done, 2 usage (workers still consuming), 4 broker unreachable.
    """
    from amqprpc.ops.migrate import MigrationRefused, migrate_request_queue
    from amqprpc.wire.topology import DEFAULT_TOPOLOGY

    logs.configure(log_format, log_level)
    svc = _load((service,), app)[0]
    try:
        done = migrate_request_queue(broker, svc.name, DEFAULT_TOPOLOGY, queue_type=queue_type,
                                     delivery_limit=max_redeliveries + 2, max_priority=svc.max_priority)
    except MigrationRefused as exc:
        _cli.fail(_cli.EXIT_USAGE, str(exc))
    except Exception as exc:  # noqa: BLE001 - broker errors: one line
        _cli.fail(_cli.EXIT_UNAVAILABLE, f"migrate-queue failed: {exc}")
    click.echo(f"{done.queue}: {done.moved} message(s) moved; arguments {done.arguments or {}}")
