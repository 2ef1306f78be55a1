"""A typed service for the contract tests: pydantic models, a dataclass, a TypedDict, an
event handler and a plain dict handler side by side. ``build(name)`` registers them on a
new Service (tests run one under a unique name); ``service`` is one named by
``AMQPRPC_TEST_SERVICE`` (default ``contract-service``)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Literal, Optional

from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from amqprpc import Service

SEEN: list = []  # what the event handler received (in-process tests)


class Item(BaseModel):
    product_id: str = Field(description="The product's id, e.g. prod_001.")
    quantity: int = Field(gt=0, description="Units wanted.")


class NewOrder(BaseModel):
    """An order as a caller places it."""

    user_id: str
    items: List[Item] = Field(min_length=1)
    note: Optional[str] = None


class Order(BaseModel):
    order_id: str
    user_id: str
    items: List[Item]
    status: Literal["created", "paid"] = "created"
    created_at: datetime.datetime


@dataclass
class Lookup:
    order_id: str


class Quote(TypedDict):
    product_id: str
    quantity: int


def create_order(payload: NewOrder) -> Order:
    """Place an order.

    Returns the order as stored."""
    return Order(order_id="o-1", user_id=payload.user_id, items=payload.items,
                 created_at=datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc))


def get_order(payload: Lookup) -> Later:
    """The order's status (its return type is defined further down the module)."""
    return Later(order_id=payload.order_id, status="paid")


def quote(payload: Quote) -> dict:
    return {"total": 2.5 * payload["quantity"]}


def echo(payload: dict) -> dict:
    """A plain dict handler: untouched."""
    return payload


class Later(BaseModel):
    order_id: str
    status: str


class Paid(BaseModel):
    order_id: str
    amount: float


def on_paid(payload: Paid) -> None:
    """Note a payment."""
    SEEN.append(payload)


def build(name: str) -> Service:
    service = Service(name)
    for handler in (create_order, get_order, quote, echo):
        service.handler(handler)
    service.event("payment.completed")(on_paid)
    return service


service = build(os.environ.get("AMQPRPC_TEST_SERVICE", "contract-service"))
