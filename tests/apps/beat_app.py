"""A service with a 2 s schedule, for tests/test_beat.py (its name from BEAT_TEST_SERVICE)."""
import os

from amqprpc import Service

service = Service(os.environ.get("BEAT_TEST_SERVICE", "beat-test"))
service.periodic("tick", every=2)


@service.handler("tick")
def tick(payload: dict) -> None:
    pass
