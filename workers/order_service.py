"""The article's order-service: takes orders, and follows them as payments come in.

``create_order`` validates the caller's token and the user with user-service, reserves the
stock with inventory-service (both nested calls, so they carry this request's trace id and
what is left of its deadline), stores the order in Redis and publishes ``order.created``.

Redis: ``{prefix}order:{order_id}``, a hash ``order_id, user_id, items (JSON), total,
status, trace_id, created_at``; status ``created`` -> ``paid`` or ``payment_failed``.

Idempotent per ``order_id``: a caller may pass its own ``order_id`` (a web tier that
accepted the order before calling); calling again with it returns the stored order and, while
it is still unpaid, publishes ``order.created`` again (its consumers are idempotent too).
"""
from __future__ import annotations

import json
import os
import time

from amqprpc import RemoteError, Service
from amqprpc.context import current
from amqprpc.logs import get_logger

from .shop import Shop, trace_id

log = get_logger("workers.order")

USERS = "user-service"
INVENTORY = "inventory-service"
_STATUS_AFTER = {"payment.completed": "paid", "payment.failed": "payment_failed"}


class Unauthorized(Exception):
    """The token or the user was refused by user-service."""


class OrderRejected(Exception):
    """inventory-service could not reserve the items (out of stock, unknown product)."""


class OrderNotFound(Exception):
    pass


def build(shop: Shop | None = None, name: str = "order-service") -> Service:
    """order-service keeping its state under ``shop`` (default: from the environment)."""
    shop = shop or Shop()
    service = Service(name)

    def load(order_id: str) -> dict | None:
        stored = shop.redis.hgetall(shop.key("order", order_id))
        if not stored:
            return None
        return {**stored, "items": json.loads(stored["items"]), "total": float(stored["total"]),
                "created_at": int(stored["created_at"])}

    def announce(order: dict) -> None:
        service.client.publish_event("order.created", {
            "order_id": order["order_id"], "user_id": order["user_id"], "total": order["total"],
            "items": order["items"]})

    @service.handler
    def create_order(payload: dict) -> dict:
        """``{"token", "user_id", "items": [{"product_id", "quantity"}], "order_id"?}`` -> the order.

        Raises Unauthorized (token or user refused) or OrderRejected (stock)."""
        order_id = payload.get("order_id") or f"o-{os.urandom(6).hex()}"
        existing = load(order_id)
        if existing is not None:
            if existing["status"] == "created":
                announce(existing)
            return existing
        user_id = payload.get("user_id") or ""
        rpc = service.client
        try:
            rpc.call(USERS, "validate_token", {"token": payload.get("token"), "user_id": user_id})
            user = rpc.call(USERS, "get_user", {"user_id": user_id})
        except RemoteError as exc:
            raise Unauthorized(exc.message) from None
        if user.get("status") != "active":
            raise Unauthorized(f"User {user_id} is {user.get('status')}")
        try:
            reservation = rpc.call(INVENTORY, "reserve", {"order_id": order_id, "items": payload.get("items")})
        except RemoteError as exc:
            raise OrderRejected(exc.message) from None
        order = {"order_id": order_id, "user_id": user_id, "items": reservation["items"],
                 "total": reservation["total"], "status": "created", "trace_id": trace_id(),
                 "created_at": int(time.time())}
        shop.redis.hset(shop.key("order", order_id), mapping={**order, "items": json.dumps(order["items"])})
        log.info("order created", order_id=order_id, user_id=user_id, total=order["total"])
        announce(order)
        return order

    @service.handler
    def get_order(payload: dict) -> dict:
        """``{"order_id"}`` -> the order as stored, with its current status."""
        order = load(payload.get("order_id") or "")
        if order is None:
            raise OrderNotFound(f"Order not found: {payload.get('order_id')}")
        return order

    @service.event("payment.*")
    def on_payment(payload: dict) -> None:
        """payment.completed marks the order paid, payment.failed marks it payment_failed."""
        status = _STATUS_AFTER.get(current.get().action)
        key = shop.key("order", payload["order_id"])
        if status is None:
            return
        if shop.redis.exists(key):
            shop.redis.hset(key, "status", status)
        log.info("order status", order_id=payload["order_id"], status=status)

    return service


service = build()
