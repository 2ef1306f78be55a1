"""A RabbitMQ node of the test session's own, on free ports, for tests that stop the
broker (the shared one on 5672 serves other test runs at the same time).

It runs as the invoking user with HOME in its own directory, so it has its own Erlang
cookie and touches nothing of the system node's.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

from kombu import Connection

RABBIT_BIN = "/usr/lib/rabbitmq/bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RabbitNode:
    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="amqprpc-rabbit-")
        self.port = free_port()
        self.name = f"amqprpc-test-{os.getpid()}-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        with open(os.path.join(self.base, "rabbitmq.conf"), "w") as conf:
            # The system's /etc/rabbitmq/rabbitmq.conf pins 5672; this file replaces it.
            conf.write(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        with open(os.path.join(self.base, "enabled_plugins"), "w") as plugins:
            plugins.write("[].\n")
        self.env = {
            **os.environ,
            "HOME": self.base,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": os.path.join(self.base, "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(self.base, "rabbitmq-env.conf"),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.base, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(self.base, "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.base, "enabled_plugins"),
        }

    def ctl(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run([f"{RABBIT_BIN}/rabbitmqctl", "-n", self.name, *args], env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def start(self, timeout: float = 90) -> None:
        subprocess.run([f"{RABBIT_BIN}/rabbitmq-server", "-detached"], env=self.env, check=True, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_up(timeout)

    def wait_up(self, timeout: float = 60) -> None:
        """Until an AMQP handshake succeeds (the port opens a little before)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with Connection(self.url, connect_timeout=1) as conn:
                    conn.connect()
                return
            except Exception:  # noqa: BLE001 - still booting
                if time.monotonic() > deadline:
                    raise AssertionError(f"RabbitMQ node {self.name} did not come up; logs in {self.base}/log")
                time.sleep(0.2)

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.wait_up()

    def ensure_running(self) -> None:
        """After a test that failed between stop_app and start_app: bring the app back so
        the next test does not fail for the wrong reason."""
        try:
            self.wait_up(timeout=1)
        except AssertionError:
            self.start_app()

    def connections(self) -> list[str]:
        """One line per client connection: ``name`` (peer address and port) and state."""
        out = self.ctl("list_connections", "-q", "name", "state", "--no-table-headers")
        return [line for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        try:
            self.ctl("stop", timeout=60)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
