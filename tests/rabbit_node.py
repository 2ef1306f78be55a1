"""A RabbitMQ node of the test session's own, on free ports, for tests that stop the
broker (the shared one on 5672 serves other test runs at the same time).

It runs as the invoking user with HOME in its own directory, so it has its own Erlang
cookie and touches nothing of the system node's.

``python rabbit_node.py start STATE`` starts one and writes what finds it again to the file
STATE; a test session with ``AMQPRPC_TEST_RABBIT_NODE=STATE`` uses that node as its
``own_broker`` (and leaves it running); ``python rabbit_node.py stop STATE`` stops it.
``make test-pythons`` shares one node between the Pythons it tests that way.
"""
from __future__ import annotations

import json
import os
import sys
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

    def save(self, path: str) -> None:
        with open(path, "w") as state:
            json.dump({"base": self.base, "port": self.port, "name": self.name, "url": self.url,
                       "env": {k: v for k, v in self.env.items() if k == "HOME" or k.startswith("RABBITMQ_")}}, state)

    @classmethod
    def attach(cls, path: str) -> "RabbitNode":
        """The node a ``start STATE`` left running (its files are not ours to delete)."""
        with open(path) as state:
            saved = json.load(state)
        node = cls.__new__(cls)
        node.base, node.port, node.name, node.url = saved["base"], saved["port"], saved["name"], saved["url"]
        node.env = {**os.environ, **saved["env"]}
        return node

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


if __name__ == "__main__":
    command, state_path = sys.argv[1:3]
    if command == "start":
        started = RabbitNode()
        started.start()
        started.save(state_path)
    else:
        RabbitNode.attach(state_path).stop()
        os.unlink(state_path)
