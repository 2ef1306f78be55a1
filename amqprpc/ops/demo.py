"""``amqprpc demo``: the seed article's scenario, end to end against a real broker and Redis.

The whole shop (user, order, payment, inventory, notification) runs in this process, in a
namespace of its own (``Topology.namespaced`` exchanges and queues, its own Redis prefix),
so the demo never meets real workers or other runs on the same broker, and it deletes
everything it declared and stored when it is done.

The shop is found as ``amqprpc worker`` finds a service: an ``amqprpc.services`` entry
point, else the module ``workers.<name>`` from the current folder (the checkout's
``workers/``, which is not installed with amqprpc: ``make demo`` runs in the checkout). Each
module builds its service afresh with ``build(shop)``, for a ``Shop`` (the module's own:
where the shop keeps its state) under the demo's prefix. amqprpc imports no shop module by
name.
"""
from __future__ import annotations

import importlib
import json
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

import click

from amqprpc.client.rpc import RpcClient
from amqprpc.config import redact
from amqprpc.context import current_call
from amqprpc.errors import RemoteError
from amqprpc.server.events import service_queue_names, topic_matches
from amqprpc.ops.loading import SHOP_PACKAGE, missing_dependency, service_module
from amqprpc.service import Service
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology, delete
from amqprpc.server.worker import Worker

_WAIT = 10.0  # seconds the events get to fan out before the demo says what is missing
# The scenario's services, by the names their entry points have.
SHOP = ("user-service", "order-service", "payment-service", "inventory-service", "notification-service")


class DemoUnavailable(Exception):
    """The broker or Redis does not answer: the demo cannot run (exit 4), and says how to fix it."""


def _show(label: str, value: Any) -> None:
    click.echo(f"  {label:<44} -> {value}")


def load_shop(prefix: str) -> tuple[list[Service], Any]:
    """The shop's services, each built by its entry point's module for a shop state under
    ``prefix``, and that state (the ``Shop``: its Redis client and key names)."""
    try:
        modules = [importlib.import_module(service_module(name)) for name in SHOP]
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] == SHOP_PACKAGE:
            raise DemoUnavailable(f"the shop is not here: no {SHOP_PACKAGE}/ in {os.getcwd()} (run amqprpc demo "
                                  f"in an amqprpc checkout, as make demo does)") from None
        raise DemoUnavailable(missing_dependency("the shop", exc)) from None
    shop = modules[SHOP.index("order-service")].Shop(prefix=prefix)
    return [module.build(shop) for module in modules], shop


def run_demo(broker_url: str) -> None:
    namespace = f"amqprpc-demo-{os.urandom(3).hex()}"
    topology = DEFAULT_TOPOLOGY.namespaced(namespace)
    services, shop = load_shop(namespace + ":")
    _check_redis(shop)
    seen: queue.SimpleQueue[Any] = queue.SimpleQueue()
    observer = Service("demo-observer")  # a broadcast subscriber to every event: what fans out
    observer.event("#", broadcast=True)(lambda payload: seen.put((_current_event(), payload)))

    click.echo(f"Starting the shop in-process: {', '.join(s.name for s in services)}...")
    click.echo(f"  (exchanges and queues under {namespace}.*, Redis keys under {shop.prefix}*)")
    workers: list[Worker] = []
    try:
        for service in services + [observer]:
            worker = Worker(service, broker_url=broker_url, concurrency=4, topology=topology)
            try:
                worker.start()
            except Exception as exc:  # noqa: BLE001 - whatever stops a connection: say so, no traceback
                raise DemoUnavailable(
                    f"cannot connect to broker {redact(broker_url)}: {redact(str(exc))}\n  No broker answers. Start "
                    f"one with 'rabbitmq-server -detached' (or set AMQPRPC_BROKER_URL), then run 'amqprpc demo' "
                    f"again.") from None
            workers.append(worker)
        with RpcClient("demo", broker_url=broker_url, timeout=5.0, topology=topology) as client:
            _calls(client)
            _order(client, shop, services, seen)
    finally:
        for worker in workers:
            worker.shutdown(5.0)
        if workers:
            _delete(services + [observer], topology, shop, broker_url)
    click.echo("Demo finished: every call answered, every event delivered, workers stopped cleanly.")


def _delete(services: list[Service], topology: Topology, shop: Any, broker_url: str) -> None:
    """Delete what the demo declared and stored."""
    delete(broker_url, queues=[name for service in services for name in service_queue_names(service, topology)],
           exchanges=[topology.service_exchange, topology.event_exchange])
    shop.delete_all()


def _calls(client: RpcClient) -> None:
    users = client.proxy("user-service")
    click.echo("order-service calls user-service over RabbitMQ:")
    _show("users.get_user(user_id='user_001')", users.get_user(user_id="user_001"))
    _show("users.getUser(user_id='user_002')", users.getUser(user_id="user_002"))
    _show("validate_token(token='a-long-valid-token')",
          client.call("user-service", "validate_token", {"token": "a-long-valid-token"}))
    try:
        client.call("user-service", "validate_token", {"token": "short"})
    except RemoteError as exc:
        _show("validate_token(token='short')", f"RemoteError {exc.error_type}: {exc.message}")
    done = threading.Event()
    answers: list[Any] = []

    def on_done(future: Future[Any]) -> None:
        answers.append(future.result())
        done.set()

    client.call_async("user-service", "get_user", {"user_id": "user_003"}, callback=on_done)
    done.wait(5.0)
    _show("call_async(get_user user_003) callback", answers[0] if answers else "no answer")


def _order(client: RpcClient, shop: Any, services: list[Service], seen: queue.SimpleQueue[Any]) -> None:
    click.echo("A customer orders 2 x prod_001; order-service calls, then events fan out:")
    _show("inventory check_stock(prod_001)", f"{_stock(client)} in stock")
    order = client.call("order-service", "create_order", {
        "token": "a-long-valid-token", "user_id": "user_001", "items": [{"product_id": "prod_001", "quantity": 2}]})
    order_id, trace_id = order["order_id"], order["trace_id"]
    _show("order-service create_order", f"{order_id} {order['status']}, total {order['total']:.2f}")
    redis, key = shop.redis, shop.key

    def settled() -> bool:
        return bool(redis.hget(key("order", order_id), "status") == "paid"
                and redis.hget(key("reservation", order_id), "status") == "committed"
                and redis.llen(key("notifications", order_id)) >= 2)

    deadline = time.monotonic() + _WAIT
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.02)  # a demo waiting for a store to show a result; workers never poll
    events = []
    while not seen.empty():
        name, payload = seen.get()
        if payload.get("order_id") == order_id:
            events.append(name)
    for name in events:
        subscribers = [f"{s.name}.{h}" for s in services for h, sub in s.events.items()
                       if topic_matches(sub.pattern, name)]
        _show(f"event {name}", ", ".join(subscribers))
    payment = json.loads(redis.get(key("payment", order_id)) or "{}")
    reservation = redis.hgetall(key("reservation", order_id))
    _show("payment-service (on order.created)",
          f"payment {payment.get('payment_id')} {payment.get('status')}: {payment.get('amount', 0):.2f}")
    _show("inventory-service (reserve, on payment)",
          f"reservation {reservation.get('status')}, "
          f"{_stock(client)} left in stock")
    _show("order-service (on payment.completed)", f"order {redis.hget(key('order', order_id), 'status')}")
    notes = [json.loads(n) for n in redis.lrange(key("notifications", order_id), 0, -1)]
    for note in notes:
        _show(f"notification-service (on {note['event']})", f"sent: {note['message']}")
    traces = {payment.get("trace_id"), reservation.get("trace_id"), *(n["trace_id"] for n in notes)}
    _show("trace id of every record", trace_id if traces == {trace_id} else f"MIXED: {sorted(map(str, traces))}")
    if not settled() or traces != {trace_id}:
        raise click.ClickException(f"the order's events did not all arrive within {_WAIT:g}s")


def _stock(client: RpcClient) -> int:
    stock: int = client.call("inventory-service", "check_stock", {"product_id": "prod_001"})["stock"]
    return stock


def _current_event() -> str:
    call = current_call()
    return call.action if call is not None else ""


def _check_redis(shop: Any) -> None:
    import redis

    try:
        shop.redis.ping()
    except redis.RedisError as exc:
        raise DemoUnavailable(f"Redis does not answer at {redact(shop.redis_url)}: {redact(str(exc))}\n  Start it with "
                              f"'redis-server --daemonize yes' (or set AMQPRPC_REDIS_URL).") from None
