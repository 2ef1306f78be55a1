"""The article's user-service: look users up, validate tokens, note who was seen when."""
from __future__ import annotations

import time

from amqprpc import Service

from .models import LastSeen, TokenCheck, TokenValid, User, UserRef

# The article's sample data. A real service would read a database.
USERS = {
    "user_001": {"id": "user_001", "name": "Alice Zhang", "email": "alice@example.com", "status": "active"},
    "user_002": {"id": "user_002", "name": "Bob Li", "email": "bob@example.com", "status": "active"},
    "user_003": {"id": "user_003", "name": "Carol Wang", "email": "carol@example.com", "status": "suspended"},
}


class UserNotFound(Exception):
    pass


def get_user(payload: UserRef) -> User:
    """The user of that id. Raises UserNotFound."""
    user = USERS.get(payload.user_id)
    if user is None:
        raise UserNotFound(f"User not found: {payload.user_id}")
    return User.model_validate(user)


def validate_token(payload: TokenCheck) -> TokenValid:
    """Accept tokens of at least 10 characters (the article's rule); refuse shorter ones (ValueError)."""
    if len(payload.token or "") < 10:
        raise ValueError("Invalid token")
    return TokenValid(valid=True, user_id=payload.user_id)


# When each user was last seen (touch), in this process only: a real service would store it.
LAST_SEEN: dict = {}


def touch(payload: UserRef) -> None:
    """Note that a user was seen (what callers send as a cast: nobody waits for the answer)."""
    if payload.user_id not in USERS:
        raise UserNotFound(f"User not found: {payload.user_id}")
    LAST_SEEN[payload.user_id] = int(time.time())


def last_seen(payload: UserRef) -> LastSeen:
    """When ``touch`` last noted the user (epoch seconds), or None."""
    return LastSeen(user_id=payload.user_id, last_seen=LAST_SEEN.get(payload.user_id))


def build(shop=None, name: str = "user-service") -> Service:
    """user-service. It keeps no state in Redis; ``shop`` is accepted so that every shop
    module builds alike (``build(shop)``)."""
    service = Service(name)
    for handler in (get_user, validate_token, touch, last_seen):
        service.handler(handler)
    return service


service = build()
