"""``amqprpc dashboard``: the live operations page (needs ``pip install 'amqprpc[dashboard]'``).

Its own module, registered by :mod:`amqprpc.cli`; it imports nothing from there (that would
be an import cycle), so its few shared options are spelled out here with the same names
and environment variables as the other commands'. FastAPI and uvicorn are imported only
when the command runs.
"""
from __future__ import annotations

import math
import sys

import click

from amqprpc import logs
from amqprpc.config import DEFAULT_BROKER_URL, DEFAULT_REDIS_URL, redact

EXIT_USAGE, EXIT_UNAVAILABLE = 2, 4


def _fail(code: int, message: str) -> None:
    click.echo(f"Error: {redact(message)}", err=True)
    sys.exit(code)


@click.command()
@click.option("--host", envvar="AMQPRPC_DASHBOARD_HOST", default="127.0.0.1", show_default=True, show_envvar=True,
              help="Address to serve on. Anything but loopback needs --auth or --token.")
@click.option("--port", envvar="AMQPRPC_DASHBOARD_PORT", default=8765, show_default=True, show_envvar=True,
              type=click.IntRange(min=0, max=65535), help="TCP port (0: any free port, logged).")
@click.option("--auth", "user_password", envvar="AMQPRPC_DASHBOARD_AUTH", default=None, show_envvar=True,
              metavar="USER:PASSWORD", help="Require HTTP Basic authentication.")
@click.option("--token", envvar="AMQPRPC_DASHBOARD_TOKEN", default=None, show_envvar=True, metavar="TOKEN",
              help="Require 'Authorization: Bearer TOKEN' (a browser opens the page once with ?token=TOKEN).")
@click.option("--management-url", envvar="AMQPRPC_MANAGEMENT_URL", default=None, show_envvar=True, metavar="URL",
              help="RabbitMQ's management API (e.g. http://localhost:15672) for unacked counts and rates; "
                   "without it queues are read with passive declares (ready and consumers).")
@click.option("--interval", envvar="AMQPRPC_DASHBOARD_INTERVAL", default=1.0, show_default=True, show_envvar=True,
              type=click.FloatRange(min=0.2, max=2.0), help="Seconds between refreshes of the page's data.")
@click.option("--stale-after", envvar="AMQPRPC_DASHBOARD_STALE_AFTER", default=15.0, show_default=True,
              show_envvar=True, type=click.FloatRange(min=0.1),
              help="Seconds without a heartbeat after which an instance is shown as stale.")
@click.option("--pidfile", envvar="AMQPRPC_PIDFILE", default=None, show_envvar=True,
              type=click.Path(dir_okay=False), help="Write the pid here; refuse to start if it names a live process.")
@click.option("--broker-wait", envvar="AMQPRPC_BROKER_WAIT", default=math.inf, show_default="forever",
              show_envvar=True, type=click.FloatRange(min=0), metavar="SECONDS",
              help="How long an unreachable broker is retried at start before exit 4.")
@click.option("--reconnect-cap", envvar="AMQPRPC_RECONNECT_CAP", default=10.0, show_default=True, show_envvar=True,
              type=click.FloatRange(min=0.1), help="Longest wait in seconds between broker connect attempts.")
@click.option("--redis", "redis_url", envvar="AMQPRPC_REDIS_URL", default=DEFAULT_REDIS_URL, show_default=True,
              show_envvar=True, help="Redis URL (the service registry and the circuit breakers).")
@click.option("--broker", envvar="AMQPRPC_BROKER_URL", default=DEFAULT_BROKER_URL,
              show_default=redact(DEFAULT_BROKER_URL), show_envvar=True, help="Broker URL.")
@click.option("--log-level", envvar="AMQPRPC_LOG_LEVEL", default="info", show_default=True, show_envvar=True,
              type=click.Choice(logs.LEVELS, case_sensitive=False))
@click.option("--log-format", envvar="AMQPRPC_LOG_FORMAT", default="console", show_default=True, show_envvar=True,
              type=click.Choice(["json", "console"]), help="json for log shippers, console for people.")
def dashboard(host: str, port: int, user_password: str | None, token: str | None, management_url: str | None,
              interval: float, stale_after: float, pidfile: str | None, broker_wait: float, reconnect_cap: float,
              redis_url: str, broker: str, log_level: str, log_format: str) -> None:
    """Serve a live operations page: services and instances, queues, actions, circuit
    breakers, dead letters (browse, replay, purge), updated every second; and the same
    data as JSON under /api/.

    \b
    Bound to 127.0.0.1 by default; another --host needs --auth USER:PASSWORD or
    --token TOKEN (else exit 2). Signals as for 'worker' (SIGTERM/SIGINT stop, exit 0).
    Exit 2 for usage errors (also a port already taken), 4 when the broker stayed
    unreachable for --broker-wait.
    """
    from amqprpc.dashboard.auth import bind_refusal

    refusal = bind_refusal(host, user_password, token)
    if refusal:
        _fail(EXIT_USAGE, refusal)
    try:
        from amqprpc.dashboard.app import create_app
        from amqprpc.dashboard.auth import Auth, is_loopback
        from amqprpc.dashboard.collect import Collector
        from amqprpc.dashboard.deadletters import Operations
        from amqprpc.dashboard.queues import ManagementQueues, PassiveQueues, QueueSource
        from amqprpc.dashboard.server import DashboardDaemon, serve
    except ImportError as exc:
        _fail(EXIT_USAGE, f"the dashboard needs FastAPI and uvicorn ({exc}): pip install 'amqprpc[dashboard]'")
    from amqprpc.errors import StartupError
    from amqprpc.ops.registry import Registry

    logs.configure(log_format, log_level)
    logs.bind_process(service="amqprpc-dashboard")
    queues: QueueSource = (ManagementQueues(management_url, broker) if management_url else PassiveQueues(broker))
    from amqprpc.config import redis_client
    from amqprpc.ops.beat import announced_schedules

    schedules_redis = redis_client(redis_url, 2.0)
    collector = Collector(Registry(redis_url), queues, interval=interval, stale_after=stale_after,
                          extensions={"schedules": lambda: announced_schedules(schedules_redis)})
    auth = Auth(user_password, token, loopback_only=is_loopback(host))
    app = create_app(collector, Operations(broker, redis_url=redis_url), auth, broker_url=broker)
    daemon = DashboardDaemon(app, collector, host=host, port=port, broker_url=broker, reconnect_cap=reconnect_cap)
    try:
        code = serve(daemon, pidfile=pidfile, broker_wait=broker_wait)
    except StartupError as exc:
        _fail(EXIT_USAGE, str(exc))
    except Exception as exc:  # noqa: BLE001 - connection failures at start: one line, no traceback
        _fail(EXIT_UNAVAILABLE, redact(f"cannot connect to broker {broker}: {exc}"))
    sys.exit(code)
