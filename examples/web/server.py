"""The shop's web tier, accept-then-poll: it never waits on a consumer.

``POST /api/orders`` submits the order to order-service ``create_order`` (``client.submit``:
broker-confirmed, reply routed to the collector queue) and answers ``202 Accepted`` with
the correlation id at once. ``GET /api/status?cid=...`` answers ``pending`` until
``amqprpc collector`` has stored the reply in Redis, then the result. ``GET /`` is a page
whose script does both.

Standard library only (``http.server.ThreadingHTTPServer``): the example is about the
pattern, not a framework. Run it (with the collector and the service, see README.md)::

    python examples/web/server.py --port 8000
    python examples/web/server.py --port 8000 --with-services   # collector + worker in-process
"""
from __future__ import annotations

import json
import pathlib
import re
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import click

from amqprpc import ResponseStore, RpcClient, Topology, logs
from amqprpc.cli import EXIT_UNAVAILABLE, EXIT_USAGE, broker_option, fail, logging_options, redis_option
from amqprpc.config import DEFAULT_COLLECTOR_QUEUE
from amqprpc.errors import CallTimeout, ServiceUnavailable
from amqprpc.loading import ServiceNotFound, load_service

log = logs.get_logger("amqprpc.examples.web")

STATIC = pathlib.Path(__file__).resolve().parent / "static"
MAX_BODY = 64 * 1024  # bytes; an order is a few hundred
_CID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class ShopApp:
    """What the handlers share: one thread-safe client, one store, the target action."""

    def __init__(self, client: RpcClient, store: ResponseStore, service: str, action: str):
        self.client = client
        self.store = store
        self.service = service
        self.action = action

    def create_order(self, order: dict) -> tuple[int, dict]:
        try:
            cid = self.client.submit(self.service, self.action, order, timeout=5.0)
        except ServiceUnavailable as exc:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "unavailable", "error": str(exc)}
        except CallTimeout as exc:
            return HTTPStatus.GATEWAY_TIMEOUT, {"status": "unavailable", "error": str(exc)}
        log.info("order accepted", correlation_id=cid, service=self.service, action=self.action)
        return HTTPStatus.ACCEPTED, {"status": "accepted", "correlation_id": cid}

    def status(self, cid: str) -> tuple[int, dict]:
        reply = self.store.get(cid)
        if reply is None:
            return HTTPStatus.OK, {"status": "pending", "correlation_id": cid}
        if reply.get("success"):
            return HTTPStatus.OK, {"status": "done", "correlation_id": cid, "result": reply.get("data")}
        return HTTPStatus.OK, {"status": "failed", "correlation_id": cid, "error": reply.get("error"),
                               "error_type": reply.get("error_type")}


class Handler(BaseHTTPRequestHandler):
    server: "WebServer"
    server_version = "amqprpc-shop/1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, (STATIC / "index.html").read_bytes(), "text/html; charset=utf-8")
        elif url.path == "/api/status":
            cid = (parse_qs(url.query).get("cid") or [""])[0]
            if not _CID.match(cid):
                self._json(HTTPStatus.BAD_REQUEST, {"status": "error", "error": "cid is missing or malformed"})
                return
            self._guarded(self.server.app.status, cid)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"status": "error", "error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        if urlsplit(self.path).path != "/api/orders":
            self._json(HTTPStatus.NOT_FOUND, {"status": "error", "error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"status": "error", "error": "order too large"})
            return
        try:
            order = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            order = None
        if not isinstance(order, dict):
            self._json(HTTPStatus.BAD_REQUEST, {"status": "error", "error": "the body must be a JSON object"})
            return
        self._guarded(self.server.app.create_order, order)

    def _guarded(self, fn, arg: Any) -> None:
        try:
            status, doc = fn(arg)
        except Exception as exc:  # noqa: BLE001 - Redis or broker trouble: 503, never a traceback
            log.warning("request failed", path=self.path, error=str(exc))
            status, doc = HTTPStatus.SERVICE_UNAVAILABLE, {"status": "unavailable", "error": type(exc).__name__}
        self._json(status, doc)

    def _json(self, status: int, doc: dict) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("http", line=fmt % args)


class WebServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: ShopApp):
        super().__init__(address, Handler)
        self.app = app


@click.command()
@click.option("--host", envvar="SHOP_WEB_HOST", default="127.0.0.1", show_default=True, show_envvar=True)
@click.option("--port", envvar="SHOP_WEB_PORT", default=8000, show_default=True, show_envvar=True, type=int,
              help="0 picks a free port (printed on start).")
@click.option("--service", envvar="SHOP_ORDER_SERVICE", default="order-service", show_default=True,
              show_envvar=True, help="The service that creates orders.")
@click.option("--action", envvar="SHOP_ORDER_ACTION", default="create_order", show_default=True, show_envvar=True)
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
def main(host: str, port: int, service: str, action: str, queue_name: str, key_prefix: str, with_services: bool,
         app: str | None, redis_url: str, broker: str, log_format: str, log_level: str) -> None:
    """Serve the shop's web tier (and its page) until SIGTERM/SIGINT."""
    logs.configure(log_format, log_level)
    topology = Topology(collector_queue=queue_name)
    store = ResponseStore(redis_url, prefix=key_prefix)
    try:
        stop_services = _start_services(service, app, store, topology, broker) if with_services else (lambda: None)
        client = RpcClient("shop-web", broker_url=broker, topology=topology)
    except ServiceNotFound as exc:
        raise click.UsageError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - no broker at start: one line, exit 4 as the CLI does
        fail(EXIT_UNAVAILABLE, f"cannot start: {exc}")
    try:
        server = WebServer((host, port), ShopApp(client, store, service, action))
    except OSError as exc:  # port taken, address not ours: a usage error, one line
        client.close()
        stop_services()
        fail(EXIT_USAGE, f"cannot listen on {host}:{port}: {exc.strerror or exc}")

    def on_signal(signum, _frame):
        # shutdown() waits for serve_forever to return: call it from another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bound_host, bound_port = server.server_address[:2]
    click.echo(f"listening on http://{bound_host}:{bound_port}/", nl=True)
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        client.close()
        stop_services()


def _start_services(service: str, app: str | None, store: ResponseStore, topology: Topology, broker: str):
    from amqprpc.collector import Collector
    from amqprpc.worker import Worker

    loaded = load_service(service, app)
    if loaded.name != service:
        raise click.UsageError(f"--app loads {loaded.name!r} but orders go to --service {service!r}")
    services = [loaded]
    if app is None and service == "order-service":
        # The shipped order-service calls user- and inventory-service, and its events feed
        # payment- and notification-service: run the whole shop with it.
        from workers.shop import build_all
        services += [other for other in build_all() if other.name != service]
    workers = [Worker(each, broker_url=broker, topology=topology, concurrency=4) for each in services]
    collector = Collector(store, broker_url=broker, topology=topology)
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
