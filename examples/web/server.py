"""Serve the shop's web tier (``shop_web.py``, FastAPI) under uvicorn.

    python examples/web/server.py --port 8000
    python examples/web/server.py --port 8000 --with-services   # collector + the shop in-process

Needs the ``web`` extra (``pip install 'amqprpc[web]'``: FastAPI, uvicorn, websockets).
Prints ``listening on http://HOST:PORT/`` once the app is ready (its lifespan connected to
the broker); stops on SIGTERM/SIGINT (exit 0). A broker that does not answer at start is one
line and exit 4, a port already taken exit 2.
"""
from __future__ import annotations

import asyncio
import logging
import pathlib
import socket
import sys

import click
import uvicorn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # shop_web.py beside this file
sys.path.append(str(pathlib.Path(__file__).resolve().parents[2]))  # the checkout: its shop (workers/) is not installed

from shop_web import Settings, create_app  # noqa: E402

from amqprpc import ResponseStore, Topology, logs  # noqa: E402
from amqprpc.cli import EXIT_UNAVAILABLE, EXIT_USAGE, broker_option, fail, logging_options, redis_option  # noqa: E402
from amqprpc.config import DEFAULT_COLLECTOR_QUEUE  # noqa: E402
from amqprpc.ops.loading import ServiceNotFound, load_service  # noqa: E402

log = logs.get_logger("amqprpc.examples.web")


class _Server(uvicorn.Server):
    """Says where it listens once the app's lifespan has connected (tests wait for it), and
    exits 0 after a SIGTERM/SIGINT stop, as the CLI's daemons do."""

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # uvicorn would re-raise it at the end: death by signal, not exit 0

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = sockets[0].getsockname()[:2]
            click.echo(f"listening on http://{host}:{port}/")
            sys.stdout.flush()


@click.command()
@click.option("--host", envvar="SHOP_WEB_HOST", default="127.0.0.1", show_default=True, show_envvar=True)
@click.option("--port", envvar="SHOP_WEB_PORT", default=8000, show_default=True, show_envvar=True, type=int,
              help="0 picks a free port (printed on start).")
@click.option("--service", envvar="SHOP_ORDER_SERVICE", default="order-service", show_default=True,
              show_envvar=True, help="The service that creates (create_order) and reads (get_order) orders.")
@click.option("--action", envvar="SHOP_ORDER_ACTION", default="create_order", show_default=True, show_envvar=True)
@click.option("--call-timeout", envvar="SHOP_CALL_TIMEOUT", default=5.0, show_default=True, show_envvar=True,
              type=float, help="Seconds for GET /api/orders/{id}'s call (then 504) and for submit's broker confirm.")
@click.option("--ws-wait", envvar="SHOP_WS_WAIT", default=30.0, show_default=True, show_envvar=True, type=float,
              help="Longest a WebSocket or long poll waits for a reply before answering pending.")
@click.option("--queue", "queue_name", envvar="AMQPRPC_COLLECTOR_QUEUE", default=DEFAULT_COLLECTOR_QUEUE,
              show_default=True, show_envvar=True, help="The collector queue (as for 'amqprpc collector').")
@click.option("--key-prefix", envvar="AMQPRPC_RESPONSE_PREFIX", default="response:", show_default=True,
              show_envvar=True, help="As for 'amqprpc collector'.")
@click.option("--with-services", is_flag=True,
              help="Also run the collector and a worker of --service in this process (a one-command demo).")
@click.option("--app", envvar="AMQPRPC_APP", metavar="MODULE:ATTR",
              help="With --with-services: where the service is (default: as 'amqprpc worker' finds it).")
@redis_option
@broker_option
@logging_options("info")
def main(host: str, port: int, service: str, action: str, call_timeout: float, ws_wait: float, queue_name: str,
         key_prefix: str, with_services: bool, app: str | None, redis_url: str, broker: str, log_format: str,
         log_level: str) -> None:
    """Serve the shop's web tier (and its page) until SIGTERM/SIGINT."""
    logs.configure(log_format, log_level)
    settings = Settings(service=service, action=action, broker_url=broker, redis_url=redis_url,
                        collector_queue=queue_name, key_prefix=key_prefix, call_timeout=call_timeout, ws_wait=ws_wait)
    try:
        listener = socket.create_server((host, port))
    except OSError as exc:
        fail(EXIT_USAGE, f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    try:
        stop_services = _start_services(service, app, settings) if with_services else (lambda: None)
    except ServiceNotFound as exc:
        raise click.UsageError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - no broker at start: one line, exit 4 as the CLI does
        fail(EXIT_UNAVAILABLE, f"cannot start: {exc}")
    # Logging stays ours (structlog lines, see logs.configure); the app logs each request itself.
    # wsproto: uvicorn's default (websockets-sansio) logs every refused upgrade (our 404/503) as an error.
    asgi = create_app(settings)
    server = _Server(uvicorn.Config(asgi, ws="wsproto", log_config=None, access_log=False, lifespan="on",
                                    timeout_graceful_shutdown=5))
    logging.getLogger("uvicorn.error").addFilter(_no_startup_traceback)
    try:
        asyncio.run(server.serve(sockets=[listener]))
    except SystemExit:  # uvicorn's own exit when the lifespan failed: ours says why
        pass
    finally:
        stop_services()
    if not server.started:
        fail(EXIT_UNAVAILABLE, f"cannot start: {getattr(asgi.state, 'startup_error', 'the app did not start')}")


def _no_startup_traceback(record: logging.LogRecord) -> bool:
    """Drop the traceback uvicorn logs when the lifespan fails (the exit line says why)."""
    return not record.getMessage().startswith("Traceback")


def _start_services(service: str, app: str | None, settings: Settings):
    from amqprpc.ops.collector import Collector
    from amqprpc.server.worker import Worker

    loaded = load_service(service, app)
    if loaded.name != service:
        raise click.UsageError(f"--app loads {loaded.name!r} but orders go to --service {service!r}")
    services = [loaded]
    if app is None and service == "order-service":
        # The shipped order-service calls user- and inventory-service, and its events feed
        # payment- and notification-service: run the whole shop with it.
        from workers import build_all
        services += [other for other in build_all() if other.name != service]
    topology = Topology(collector_queue=settings.collector_queue)
    workers = [Worker(each, broker_url=settings.broker_url, topology=topology, concurrency=4) for each in services]
    collector = Collector(ResponseStore(settings.redis_url, prefix=settings.key_prefix),
                          broker_url=settings.broker_url, topology=topology)
    for worker in workers:
        worker.start()
    collector.start()

    def stop() -> None:
        for worker in workers:
            worker.shutdown(5.0)
        collector.shutdown(5.0)
    return stop


if __name__ == "__main__":
    main()
