"""The shop's contract: what each action takes and returns, and what each event carries.

The handlers are annotated with these models, so a payload is validated before a handler
runs (a caller gets a ``ValidationError`` reply naming each bad field) and the AsyncAPI
documents in ``docs/asyncapi/`` describe them (``amqprpc asyncapi order-service``). One
module for every service, because services share them: the order an order-service caller
sends has the lines inventory-service reserves; the event payment-service publishes is the
one order- and inventory-service consume.

Events are read leniently (optional fields, extra fields kept): a consumer must not refuse
an event because a newer producer added a field, or an older one left one out.
"""
from __future__ import annotations

from typing import List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


# --- user-service ----------------------------------------------------------------------
class UserRef(BaseModel):
    """Which user (get_user, touch, last_seen)."""

    user_id: str = Field(description="e.g. user_001")


class User(BaseModel):
    id: str
    name: str
    email: str
    status: Literal["active", "suspended"]


class TokenCheck(BaseModel):
    """A token to check; a missing or short one is refused with ValueError 'Invalid token'."""

    token: Optional[str] = None
    user_id: str = "user_001"


class TokenValid(BaseModel):
    valid: bool
    user_id: str


class LastSeen(BaseModel):
    user_id: str
    last_seen: Optional[int] = Field(description="When touch last noted the user, epoch seconds; null if never.")


# --- inventory-service -----------------------------------------------------------------
class ProductRef(BaseModel):
    product_id: str = Field(description="e.g. prod_001")


class Product(BaseModel):
    product_id: str
    name: str
    price: float
    stock: int = Field(description="Units in stock now.")


class OrderLine(BaseModel):
    """A line of an order as a caller writes it."""

    product_id: str = Field(description="e.g. prod_001")
    quantity: int = Field(1, ge=1, description="Units wanted.")


class PricedLine(BaseModel):
    """A line as reserved: with the product's name and unit price."""

    product_id: str
    name: str
    price: float
    quantity: int


class ReserveRequest(BaseModel):
    order_id: str = Field(min_length=1)
    items: List[OrderLine] = Field(min_length=1)


class Reservation(BaseModel):
    order_id: str
    items: List[PricedLine]
    total: float
    status: Literal["reserved", "committed", "released"]


# --- order-service ---------------------------------------------------------------------
class NewOrder(BaseModel):
    """An order as a caller places it. A caller-chosen order_id makes it idempotent."""

    token: Optional[str] = Field(None, description="The caller's token (validated by user-service).")
    user_id: str
    items: List[OrderLine] = Field(min_length=1)
    order_id: Optional[str] = Field(None, description="Your own id for the order; generated when absent.")


class OrderRef(BaseModel):
    order_id: str


class Order(BaseModel):
    order_id: str
    user_id: str
    items: List[PricedLine]
    total: float
    status: Literal["created", "paid", "payment_failed"]
    trace_id: str = Field(description="The trace id of the request that created it.")
    created_at: int = Field(description="Epoch seconds.")


# --- events ----------------------------------------------------------------------------
class OrderCreated(BaseModel):
    """order.created (published by order-service)."""

    model_config = ConfigDict(extra="allow")

    order_id: str
    user_id: Optional[str] = None
    total: float = 0.0
    items: List[PricedLine] = []


class PaymentOutcome(BaseModel):
    """payment.completed / payment.failed (published by payment-service)."""

    model_config = ConfigDict(extra="allow")

    order_id: str
    user_id: Optional[str] = None
    payment_id: Optional[str] = None
    amount: float = 0.0
    reason: Optional[str] = Field(None, description="Why it failed (payment.failed only).")


class OrderEvent(BaseModel):
    """Any order.* or payment.* event, as notification-service reads it: only the order
    it is about, the rest kept for the message's template."""

    model_config = ConfigDict(extra="allow")

    order_id: Optional[str] = None
    user_id: Optional[str] = None
