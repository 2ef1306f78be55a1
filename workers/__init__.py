"""The shop's ready services (the seed article's user, order, payment, inventory and
notification services). Each module exposes ``service``; ``amqprpc worker <name>`` finds it
through the ``amqprpc.services`` entry points (setup.cfg)."""
from __future__ import annotations


def build_all(shop=None) -> list:
    """Every service of the shop built for ``shop`` (a :class:`workers.shop.Shop`; default:
    from the environment): user, order, payment, inventory, notification, what the demo's
    tests and the web example run together."""
    from . import inventory_service, notification_service, order_service, payment_service, user_service
    from .shop import Shop

    shop = shop or Shop()
    return [user_service.build(shop), order_service.build(shop), payment_service.build(shop),
            inventory_service.build(shop), notification_service.build(shop)]
