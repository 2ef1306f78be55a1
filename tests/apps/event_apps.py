"""Services for test_events.py's real worker processes (``amqprpc worker X --app event_apps:X``).

Names, event patterns and Redis keys all derive from ``EVENT_TEST_NS``, so runs never meet.
Each handler counts what it handled in Redis: per event (exactly once?) and per process.
"""
import os

import redis

from amqprpc import Service
from amqprpc.logs import get_logger

NS = os.environ.get("EVENT_TEST_NS", "event-apps")
_redis = redis.Redis.from_url(os.environ.get("AMQPRPC_REDIS_URL", "redis://localhost:6379/0"), decode_responses=True)
log = get_logger("event_apps")


def _counter(service: Service, handler: str, broadcast: bool = False) -> None:
    @service.event(f"{NS}.thing.*", name=handler, broadcast=broadcast)
    def count(payload: dict) -> None:
        key = f"{NS}:{service.name}:{handler}"
        _redis.hincrby(key, str(payload["n"]), 1)
        _redis.hincrby(key + ":by-pid", str(os.getpid()), 1)
        log.info("counted", n=payload["n"], counter=handler)


billing = Service(f"{NS}-billing")
_counter(billing, "count")
_counter(billing, "refresh", broadcast=True)

audit = Service(f"{NS}-audit")
_counter(audit, "count")
