"""The article's inventory-service: stock levels, reservations for orders, and what a
payment's outcome does to them.

Redis (``{prefix}`` = the shop's key prefix):
- ``{prefix}stock:{product_id}``: units in stock (integer), seeded from :data:`CATALOG` on first use;
- ``{prefix}reservation:{order_id}``: hash ``order_id, items (JSON), total, status, trace_id``,
  status ``reserved`` -> ``committed`` (payment.completed) or ``released`` (payment.failed,
  the units go back to stock).

Reserving is one Lua script, so concurrent orders never oversell, and it is idempotent per
order: a redelivered ``reserve`` finds the reservation and does not take the stock twice.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Dict, List

from amqprpc import Service
from amqprpc.logs import get_logger

from .models import OrderLine, PaymentOutcome, Product, ProductRef, Reservation, ReserveRequest
from .shop import Shop, trace_id

log = get_logger("workers.inventory")

# The shop's products. Prices are in the shop's currency; stock is what a fresh shop has.
CATALOG: Dict[str, Dict[str, Any]] = {
    "prod_001": {"product_id": "prod_001", "name": "Mechanical keyboard", "price": 49.90, "stock": 100},
    "prod_002": {"product_id": "prod_002", "name": "USB-C hub", "price": 19.90, "stock": 100},
    "prod_003": {"product_id": "prod_003", "name": "4K monitor", "price": 329.00, "stock": 10},
}

# KEYS: stock key of each item..., reservation key. ARGV: quantity of each item..., then
# the reservation hash as field, value pairs. Returns 0 reserved, -1 already reserved,
# i > 0: item i is short.
_RESERVE = """
local n = #KEYS - 1
if redis.call('EXISTS', KEYS[n + 1]) == 1 then return -1 end
for i = 1, n do
  if tonumber(redis.call('GET', KEYS[i]) or '0') < tonumber(ARGV[i]) then return i end
end
for i = 1, n do redis.call('DECRBY', KEYS[i], ARGV[i]) end
redis.call('HSET', KEYS[n + 1], unpack(ARGV, n + 1))
return 0
"""

# KEYS: reservation key, stock key of each item... ARGV: quantity of each item.
# Gives the units back once, and only while the reservation still holds them.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'reserved' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'released')
for i = 2, #KEYS do redis.call('INCRBY', KEYS[i], ARGV[i - 1]) end
return 1
"""


class UnknownProduct(Exception):
    pass


class OutOfStock(Exception):
    pass


def _script(shop: Shop, source: str):
    """The Lua script ``source`` registered with the shop's Redis client (once per client)."""
    return _registered(shop.redis, source)


@functools.lru_cache(maxsize=None)
def _registered(client, source: str):
    return client.register_script(source)


def stock_key(shop: Shop, product_id: str) -> str:
    return shop.key("stock", product_id)


def seed(shop: Shop, product_ids) -> None:
    """SET NX: the catalog's stock only for products this shop has never stocked."""
    with shop.redis.pipeline(transaction=False) as pipe:
        for product_id in product_ids:
            pipe.set(stock_key(shop, product_id), CATALOG[product_id]["stock"], nx=True)
        pipe.execute()


def product(product_id) -> dict:
    if product_id not in CATALOG:
        raise UnknownProduct(f"Unknown product: {product_id}")
    return CATALOG[product_id]


def check_stock(shop: Shop, payload: ProductRef) -> Product:
    """The product with its units in stock. Raises UnknownProduct."""
    item = product(payload.product_id)
    seed(shop, [item["product_id"]])
    stock = shop.redis.get(stock_key(shop, item["product_id"]))  # seeded above: None only if deleted since
    return Product(**{**item, "stock": int(stock or 0)})


def wanted_units(items: List[OrderLine]) -> Dict[str, int]:
    """The lines of a reserve request as units per product (the models ensure at least one
    line and quantities of 1 or more). Raises UnknownProduct."""
    wanted: Dict[str, int] = {}
    for line in items:
        product_id = product(line.product_id)["product_id"]
        wanted[product_id] = wanted.get(product_id, 0) + line.quantity
    return wanted


def reserve(shop: Shop, payload: ReserveRequest) -> Reservation:
    """Reserve the order's items: the reservation with prices and total. Idempotent per
    order_id. Raises OutOfStock (nothing is taken) or UnknownProduct."""
    order_id = payload.order_id
    wanted = wanted_units(payload.items)
    seed(shop, wanted)
    items = [{"product_id": product_id, "name": CATALOG[product_id]["name"], "price": CATALOG[product_id]["price"],
              "quantity": quantity} for product_id, quantity in wanted.items()]
    total = round(sum(line["price"] * line["quantity"] for line in items), 2)
    key = shop.key("reservation", order_id)
    fields = {"order_id": order_id, "items": json.dumps(items), "total": total, "status": "reserved",
              "trace_id": trace_id()}
    outcome = _script(shop, _RESERVE)(
        keys=[stock_key(shop, product_id) for product_id in wanted] + [key],
        args=list(wanted.values()) + [v for pair in fields.items() for v in pair])
    if outcome > 0:
        product_id = list(wanted)[outcome - 1]
        raise OutOfStock(f"Out of stock: {product_id} ({wanted[product_id]} wanted)")
    stored = shop.redis.hgetall(key)
    log.info("inventory reserved", order_id=order_id, items=len(items), total=total, again=outcome == -1)
    return Reservation.model_validate({"order_id": order_id, "items": json.loads(stored["items"]),
                                       "total": float(stored["total"]), "status": stored["status"]})


def on_payment_completed(shop: Shop, payload: PaymentOutcome) -> None:
    """The order is paid: its reserved units are sold."""
    key = shop.key("reservation", payload.order_id)
    if shop.redis.hget(key, "status") == "reserved":
        shop.redis.hset(key, "status", "committed")
    log.info("inventory committed", order_id=payload.order_id)


def on_payment_failed(shop: Shop, payload: PaymentOutcome) -> None:
    """The payment failed: the reserved units go back to stock (once)."""
    key = shop.key("reservation", payload.order_id)
    items = json.loads(shop.redis.hget(key, "items") or "[]")
    released = _script(shop, _RELEASE)(
        keys=[key] + [stock_key(shop, line["product_id"]) for line in items],
        args=[line["quantity"] for line in items])
    log.info("inventory released", order_id=payload.order_id, released=bool(released))


def build(shop: Shop | None = None, name: str = "inventory-service") -> Service:
    """inventory-service keeping its state under ``shop`` (default: from the environment)."""
    shop = shop or Shop()
    service = Service(name)
    service.handler("check_stock")(functools.partial(check_stock, shop))
    service.handler("reserve")(functools.partial(reserve, shop))
    service.event("payment.completed", name="on_payment_completed")(functools.partial(on_payment_completed, shop))
    service.event("payment.failed", name="on_payment_failed")(functools.partial(on_payment_failed, shop))
    return service


service = build()
