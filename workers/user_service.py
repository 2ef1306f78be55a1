"""The article's user-service: look users up, validate tokens, note who was seen when."""
from __future__ import annotations

import time

from amqprpc import Service

service = Service("user-service")

# The article's sample data. A real service would read a database.
USERS = {
    "user_001": {"id": "user_001", "name": "Alice Zhang", "email": "alice@example.com", "status": "active"},
    "user_002": {"id": "user_002", "name": "Bob Li", "email": "bob@example.com", "status": "active"},
    "user_003": {"id": "user_003", "name": "Carol Wang", "email": "carol@example.com", "status": "suspended"},
}


class UserNotFound(Exception):
    pass


@service.handler("get_user")
def get_user(payload: dict) -> dict:
    """The user whose id is ``payload["user_id"]``."""
    user_id = payload.get("user_id")
    user = USERS.get(user_id)
    if user is None:
        raise UserNotFound(f"User not found: {user_id}")
    return user


@service.handler("validate_token")
def validate_token(payload: dict) -> dict:
    """Accept tokens of at least 10 characters (the article's rule); refuse shorter ones."""
    token = payload.get("token") or ""
    if len(token) < 10:
        raise ValueError("Invalid token")
    return {"valid": True, "user_id": payload.get("user_id", "user_001")}


# When each user was last seen (touch), in this process only: a real service would store it.
LAST_SEEN: dict = {}


@service.handler("touch")
def touch(payload: dict) -> None:
    """Note that a user was seen (what callers send as a cast: nobody waits for the answer)."""
    user_id = payload.get("user_id")
    if user_id not in USERS:
        raise UserNotFound(f"User not found: {user_id}")
    LAST_SEEN[user_id] = int(time.time())


@service.handler("last_seen")
def last_seen(payload: dict) -> dict:
    """When ``touch`` last noted the user (epoch seconds), or None."""
    return {"user_id": payload.get("user_id"), "last_seen": LAST_SEEN.get(payload.get("user_id"))}
