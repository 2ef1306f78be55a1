"""Integration tests talk to the real RabbitMQ named by AMQPRPC_BROKER_URL (default: the one
on 127.0.0.1:5672) and the real Redis on 127.0.0.1:6379.

`make test` starts them when installed but not running (scripts/services.sh); `make
test-rabbitmq4` runs the same suite against a RabbitMQ 4.x node of its own
(tests/apps/rabbit_node.py). A test needing a broker that does not answer fails with a clear
message, never skips silently.
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from amqprpc import Service
from amqprpc.config import broker_url as configured_broker_url
from amqprpc.testing import unique_name

# tests/unit/: no broker, no Redis; tests/integration/: files with tests that need them (each
# such test marked integration); tests/apps/: what tests run or import (apps, processes, nodes),
# importable by module name (``from procs import Proc``) from any test.
APPS = Path(__file__).resolve().parent / "apps"
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))
# The example shop (workers/) is not installed with amqprpc: tests import it from the checkout.
# Appended, so that an installed amqprpc (make test-pythons' wheel) still comes before the checkout's.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list) -> None:
    """Keep the folders truthful: a test in tests/unit/ that needs the broker or Redis (marked
    integration) belongs in tests/integration/."""
    misplaced = [item.nodeid for item in items if item.get_closest_marker("integration")
                 and Path(str(item.path)).relative_to(ROOT).parts[1:2] == ("unit",)]
    if misplaced:
        raise pytest.UsageError(f"integration tests in tests/unit/ (move them to tests/integration/): {misplaced}")


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker_url() -> str:
    from rabbit_node import broker_address

    url = configured_broker_url()
    host, port = broker_address(url)
    if not _port_open(port, host):
        pytest.fail(f"RabbitMQ does not answer on {host}:{port} (AMQPRPC_BROKER_URL): run ./scripts/services.sh "
                    "(or make test)")
    return url


@pytest.fixture(scope="session")
def redis_available() -> None:
    from urllib.parse import urlsplit

    from amqprpc.config import redis_url

    where = urlsplit(redis_url())
    host, port = where.hostname or "127.0.0.1", where.port or 6379
    if not _port_open(port, host):
        pytest.fail(f"Redis does not answer on {host}:{port} (AMQPRPC_REDIS_URL): run ./scripts/services.sh "
                    "(or make test)")


@pytest.fixture
def done_counts(redis_available):
    """(Redis client, a hash key of this test's own) that worker processes running
    ``daemon_app`` count what they ran in; deleted after the test."""
    import redis

    from amqprpc.config import redis_url

    client = redis.Redis.from_url(redis_url(), decode_responses=True)
    key = unique_name("amqprpc-test-done")
    yield client, key
    client.delete(key)


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
    on first use (a few seconds), stopped at the end of the session. Same RabbitMQ version
    as the suite's broker (AMQPRPC_TEST_RABBITMQ_ROOT, see rabbit_node.py)."""
    import os

    from rabbit_node import RabbitNode

    shared = os.environ.get("AMQPRPC_TEST_RABBIT_NODE")  # a node make test-pythons started for every Python
    if shared:
        yield RabbitNode.attach(shared)
        return
    node = RabbitNode()
    node.start()
    yield node
    node.stop()


@pytest.fixture
def worker_processes(tmp_path, broker_url):
    """Start ``amqprpc worker`` subprocesses, each logging JSON to its own file
    (``process.log_path``); whatever still runs after the test is killed."""
    import os
    import subprocess
    import sys

    started = []

    def start(service: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        log_path = tmp_path / f"{service}.{len(started)}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "amqprpc", "worker", service, "--log-format", "json",
                                        *args], stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONPATH": str(tmp_path), **(env or {})})
        process.log_path = log_path
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def log_lines(process) -> list:
    """The JSON log lines a worker process wrote so far."""
    import json

    lines = []
    for raw in process.log_path.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            pass
    return lines


def wait_ready(*processes, timeout: float = 30.0) -> None:
    from amqprpc.testing import wait_for

    for process in processes:
        wait_for(lambda: process.poll() is not None or any(line.get("event") == "worker ready"
                                                            for line in log_lines(process)), timeout=timeout)
        assert process.poll() is None, process.log_path.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_server(tmp_path):
    """Start redis-server instances of this test alone on free ports: ``start(port=None) -> (url, process)``.
    (The shared Redis on 6379 must never be stopped; a test that stops Redis stops its own.)"""
    import subprocess

    from amqprpc.testing import wait_for

    started = []

    def start(port: int | None = None):
        port = port or free_port()
        process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(tmp_path)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        wait_for(lambda: _port_open(port), timeout=10)
        return f"redis://127.0.0.1:{port}/0", process

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


class SentinelSet:
    """A master, one replica and three sentinels (``redis-server --sentinel``) of one test,
    on free ports; a master down for 1 s is failed over (quorum 2)."""

    MASTER = "amqprpc-test"

    def __init__(self, tmp_path, started: list) -> None:
        import subprocess

        from amqprpc.testing import wait_for

        self.tmp_path, self.started = tmp_path, started
        self.master_port, self.replica_port = free_port(), free_port()
        self.master = self._redis(self.master_port)
        self.replica = self._redis(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        self.sentinel_ports = [free_port() for _ in range(3)]
        for port in self.sentinel_ports:
            config = tmp_path / f"sentinel-{port}.conf"
            config.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                              f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master_port} 2\n"
                              f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                              f"sentinel failover-timeout {self.MASTER} 3000\n"
                              f"sentinel parallel-syncs {self.MASTER} 1\n")
            started.append(subprocess.Popen(["redis-server", str(config), "--sentinel"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.sentinel_ports:
            wait_for(lambda: _port_open(port), timeout=10)
        # Ready for a failover: the replica in sync, and every sentinel knows it and the other two.
        wait_for(lambda: self._info(self.replica_port).get("master_link_status") == "up", timeout=15)
        wait_for(lambda: all(self._ready(port) for port in self.sentinel_ports), timeout=20, interval=0.2)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.MASTER}/0"

    def master_address(self) -> tuple[str, int]:
        """The master as the first sentinel that answers names it."""
        import redis

        for port in self.sentinel_ports:
            try:
                host, master_port = redis.Redis(port=port, decode_responses=True, socket_timeout=1).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER)
                return host, int(master_port)
            except redis.RedisError:
                continue
        raise AssertionError("no sentinel answers")

    def wait_replicated(self) -> None:
        """Until the replica has every write the master has (what a failover then keeps)."""
        from amqprpc.testing import wait_for

        wait_for(lambda: self._info(self.replica_port).get("master_repl_offset", -1)
                 >= self._info(self.master_port).get("master_repl_offset", 0), timeout=10, interval=0.05)

    def kill_master(self) -> None:
        """kill -9 the master (the replica's link breaks, the sentinels notice in 1 s)."""
        self.master.kill()
        self.master.wait(10)

    def wait_failover(self, timeout: float = 30.0) -> None:
        """Until every sentinel names the replica as master, and it accepts writes."""
        import redis

        from amqprpc.testing import wait_for

        def promoted() -> bool:
            try:
                names = {int(redis.Redis(port=port, decode_responses=True, socket_timeout=1).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER)[1]) for port in self.sentinel_ports}
            except redis.RedisError:
                return False
            return names == {self.replica_port} and self._info(self.replica_port).get("role") == "master"

        wait_for(promoted, timeout=timeout, interval=0.2)

    def _redis(self, port: int, *args: str):
        import subprocess

        from amqprpc.testing import wait_for

        process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(self.tmp_path), *args],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started.append(process)
        wait_for(lambda: _port_open(port), timeout=10)
        return process

    @staticmethod
    def _info(port: int) -> dict:
        import redis

        try:
            return redis.Redis(port=port, decode_responses=True, socket_timeout=1).info("replication")
        except redis.RedisError:
            return {}

    def _ready(self, port: int) -> bool:
        import redis

        try:
            state = redis.Redis(port=port, decode_responses=True, socket_timeout=1).execute_command(
                "SENTINEL", "MASTER", self.MASTER)
        except redis.RedisError:
            return False
        if isinstance(state, list):  # RESP2: a flat list of names and values
            state = dict(zip(state[::2], state[1::2]))
        return int(state.get("num-slaves", 0)) >= 1 and int(state.get("num-other-sentinels", 0)) >= 2


@pytest.fixture
def redis_sentinel(tmp_path):
    """A Redis master + replica watched by three sentinels of this test alone (:class:`SentinelSet`);
    everything is killed after the test."""
    started: list = []
    try:
        yield SentinelSet(tmp_path, started)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(10)
