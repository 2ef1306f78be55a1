"""Integration tests talk to the real RabbitMQ (and Redis) on 127.0.0.1.

`make test` starts them when installed but not running (scripts/services.sh); a test
needing one that still does not answer fails with a clear message, never skips silently.
"""
from __future__ import annotations

import socket

import pytest

from amqprpc import Service
from amqprpc.config import broker_url as configured_broker_url
from amqprpc.testing import unique_name


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker_url() -> str:
    if not _port_open(5672):
        pytest.fail("RabbitMQ does not answer on 127.0.0.1:5672: run ./scripts/services.sh (or make test)")
    return configured_broker_url()


@pytest.fixture(scope="session")
def redis_available() -> None:
    if not _port_open(6379):
        pytest.fail("Redis does not answer on 127.0.0.1:6379: run ./scripts/services.sh (or make test)")


@pytest.fixture
def service_name() -> str:
    """A service name (and so request queue and routing key) of this test alone."""
    return unique_name("svc")


@pytest.fixture
def service(service_name: str) -> Service:
    return Service(service_name)


@pytest.fixture(scope="session")
def own_broker():
    """A RabbitMQ node this test session alone uses, for tests that stop and start the
    broker or need a service name (user-service) no other run is consuming. Started once,
    on first use (a few seconds), stopped at the end of the session."""
    from rabbit_node import RabbitNode

    node = RabbitNode()
    node.start()
    yield node
    node.stop()
