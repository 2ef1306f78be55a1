"""The service test_hostile_input.py's and test_stalled_link.py's real worker processes run
(``--app hostile_app:service``).

Its name comes from AMQPRPC_TEST_SERVICE; its event handler takes every event under
``{service}.*`` and counts it in Redis under the key the event names.
"""
import os
import time

import redis

from amqprpc import Service
from amqprpc.config import redis_url

service = Service(os.environ.get("AMQPRPC_TEST_SERVICE", "hostile-app"))
_redis = redis.Redis.from_url(redis_url())


@service.handler
def echo(payload: dict) -> dict:
    return payload


@service.handler
def nap(payload: dict) -> dict:
    time.sleep(payload["seconds"])
    return payload


@service.handler
def touch(payload: dict) -> None:
    """For casts: nothing to do."""


@service.event(f"{service.name}.*")
def seen(payload: dict) -> None:
    _redis.hincrby(payload["key"], str(payload["n"]), 1)
