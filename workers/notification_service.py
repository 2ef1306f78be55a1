"""The article's notification-service: tells the customer about their order and payment.

It listens to ``order.*`` and ``payment.*`` and records each notification it "sends" (a
real one would mail or push) in Redis:
- ``{prefix}notifications:{order_id}``: a list of JSON notifications, oldest first;
- ``{prefix}notified:{order_id}:{event}``: set once, so an event delivered or published
  twice notifies once.
"""
from __future__ import annotations

import functools
import json
import time

from amqprpc import Service, current_call
from amqprpc.logs import get_logger

from .models import OrderEvent
from .shop import Shop, trace_id

log = get_logger("workers.notification")

_TEMPLATES = {
    "order.created": "Order {order_id} received: {total:.2f} to pay.",
    "payment.completed": "Payment {payment_id} for order {order_id} went through: {amount:.2f}.",
    "payment.failed": "Payment for order {order_id} failed: {reason}",
}
_DEDUP_SECONDS = 7 * 24 * 3600


def notify(shop: Shop, payload: OrderEvent) -> None:
    """Record the notification of this event for its order, once per order and event."""
    call = current_call()
    event = call.action if call is not None else "unknown"
    order_id = payload.order_id
    if not order_id:
        log.warning("event without an order_id, nobody to notify")
        return
    if not shop.redis.set(shop.key("notified", order_id, event), 1, nx=True, ex=_DEDUP_SECONDS):
        log.info("already notified", order_id=order_id)
        return
    template = _TEMPLATES.get(event, "Update on order {order_id}: " + event)
    try:
        text = template.format(**payload.model_dump())
    except (KeyError, ValueError):
        text = f"Update on order {order_id}: {event}"
    notification = {"event": event, "order_id": order_id, "user_id": payload.user_id,
                    "message": text, "trace_id": trace_id(), "at": time.time()}
    shop.redis.rpush(shop.key("notifications", order_id), json.dumps(notification))
    log.info("notification sent", order_id=order_id, user_id=payload.user_id)


def build(shop: Shop | None = None, name: str = "notification-service") -> Service:
    """notification-service keeping its state under ``shop`` (default: from the environment)."""
    shop = shop or Shop()
    service = Service(name)
    service.event("order.*", name="on_order_event")(functools.partial(notify, shop))
    service.event("payment.*", name="on_payment_event")(functools.partial(notify, shop))
    return service


service = build()
