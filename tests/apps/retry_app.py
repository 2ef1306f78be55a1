"""A service for tests that run the worker as a real subprocess (``--app retry_app:service``,
with ``tests/`` on PYTHONPATH). Its name comes from AMQPRPC_TEST_SERVICE so every test
gets its own queues."""
import os

from amqprpc import Service

service = Service(os.environ.get("AMQPRPC_TEST_SERVICE", "retry-app"))


@service.handler
def echo(payload):
    return payload


@service.handler
def die(payload):
    """A handler that takes the whole worker down, as a segfaulting C extension would."""
    os._exit(17)
