"""The article's payment-service: charges every new order and says how it went.

On ``order.created`` it charges the order (simulated: amounts up to :data:`LIMIT` succeed)
and publishes ``payment.completed`` or ``payment.failed`` with ``order_id, user_id,
payment_id, amount`` (and ``reason`` when it failed).

Redis: ``{prefix}payment:{order_id}``, the payment as JSON, written with SET NX: an
``order.created`` delivered twice charges once, and publishes the stored outcome again
(events are at-least-once; every consumer of payment events is idempotent).
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Dict

from amqprpc import Service
from amqprpc.logs import get_logger

from .models import OrderCreated, PaymentOutcome
from .shop import Shop, trace_id

log = get_logger("workers.payment")

LIMIT = 10_000.0  # the simulated card limit, in the shop's currency


def on_order_created(shop: Shop, service: Service, limit: float, payload: OrderCreated) -> None:
    """Charge the order (once per order) and publish payment.completed or payment.failed."""
    order_id, amount = payload.order_id, payload.total
    payment: Dict[str, Any] = {"payment_id": f"p-{os.urandom(6).hex()}", "order_id": order_id,
               "user_id": payload.user_id, "amount": amount, "trace_id": trace_id(),
               "at": int(time.time())}
    if amount > limit:
        payment.update(status="failed", reason=f"Amount {amount:.2f} is over the limit of {limit:.2f}")
    else:
        payment.update(status="completed")
    key = shop.key("payment", order_id)
    if not shop.redis.set(key, json.dumps(payment), nx=True):
        charged = shop.redis.get(key)
        if charged is not None:  # charged already: say the same again
            payment = json.loads(charged)
    log.info("payment " + payment["status"], order_id=order_id, payment_id=payment["payment_id"], amount=amount)
    event = {name: payment[name] for name in ("order_id", "user_id", "payment_id", "amount", "reason")
             if name in payment}
    service.client.publish_event(f"payment.{payment['status']}", event)


def build(shop: Shop | None = None, name: str = "payment-service", limit: float = LIMIT) -> Service:
    """payment-service keeping its state under ``shop`` (default: from the environment);
    payments above ``limit`` fail."""
    shop = shop or Shop()
    service = Service(name)
    service.event("order.created", name="on_order_created")(functools.partial(on_order_created, shop, service, limit))
    service.publishes("payment.completed", PaymentOutcome, description=(
        "The order was charged: payment_id and amount say how much.\n\n"
        "Published again (the same payment) when order.created comes again for the order."))
    service.publishes("payment.failed", PaymentOutcome, description=(
        "The order could not be charged: reason says why.\n\n"
        "Published again (the same outcome) when order.created comes again for the order."))
    return service


service = build()
