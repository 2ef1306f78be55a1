"""Services whose handler annotations cannot be validated with: `amqprpc worker` must exit 2
at start with a one-line reason (tests/unit/test_contracts.py)."""
from __future__ import annotations

from amqprpc import Service


class Opaque:
    """A class pydantic has no schema for."""


unresolved = Service("bad-unresolved")
unsupported = Service("bad-unsupported")
no_schema = Service("bad-no-schema")


@unresolved.handler
def get_user(payload: UserQuery) -> dict:  # noqa: F821 - the point: this name is never defined
    return {}


@unsupported.handler
def add(payload: int) -> int:
    return payload


@no_schema.handler
def opaque(payload: dict) -> Opaque:
    return Opaque()
