"""RabbitMQ nodes of the test session's own, on free ports, for tests that stop the broker,
need special config, or a cluster (the shared one on 5672 serves other test runs at the
same time and is never touched).

A node runs from one of two installs:

- the system's RabbitMQ (``/usr/lib/rabbitmq``, 3.10 here): ``root=None``;
- the project's RabbitMQ 4.x (``scripts/rabbitmq4.sh`` installs Debian's into a cached
  folder): ``root=<that folder>``, every command run under ``chroot``.

The install under test comes from ``AMQPRPC_TEST_RABBITMQ_ROOT`` (unset: the system's),
so ``own_broker`` and the cluster tests use the same RabbitMQ version as the suite's
broker. Each node has its own nodename, AMQP and distribution ports, config, data and
log directories, and HOME (so its own Erlang cookie; the nodes of a cluster share one).

Run as a script, it starts a node and runs a command against it (``make test-rabbitmq4``)::

    python tests/apps/rabbit_node.py --root /var/cache/amqprpc/rabbitmq-4.x -- python -m pytest -q

A node can outlive the process that started it: :meth:`RabbitNode.save` writes what finds it
again to a file, and a test session with ``AMQPRPC_TEST_RABBIT_NODE=<that file>`` uses it as
its ``own_broker`` (and leaves it running): ``make test-pythons`` shares one node between the
Pythons it tests that way (:meth:`RabbitNode.attach`).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from kombu import Connection

RABBIT_BIN = "/usr/lib/rabbitmq/bin"
ROOT_ENV = "AMQPRPC_TEST_RABBITMQ_ROOT"
# How tests reach rabbitmqctl for the suite's broker (AMQPRPC_BROKER_URL): a command prefix.
CTL_ENV = "AMQPRPC_TEST_RABBITMQCTL"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports free at the moment, for a server that takes P..P+count-1
    (``--processes N --metrics-port P``). Below the ephemeral range: there ``free_port() + 1`` may be any
    outgoing connection's local port (Linux hands bind(0) odd ports and connect() even ones)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            ephemeral = int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    for _ in range(200):
        base = random.randrange(10000, ephemeral - count)
        if all(_bindable(base + k) for k in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports between 10000 and {ephemeral}")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def broker_address(url: str) -> tuple[str, int]:
    """(host, port) of the first broker a URL (or failover list) names."""
    info = Connection(url).info()  # kombu only parses the URL here
    return info["hostname"], int(info["port"])


def install_root() -> str | None:
    """The chroot of the RabbitMQ under test, or None for the system's."""
    return os.environ.get(ROOT_ENV) or None


def suite_ctl(*args: str, timeout: float = 60) -> str:
    """``rabbitmqctl ARGS`` against the suite's broker (the system node unless the run
    named another one in AMQPRPC_TEST_RABBITMQCTL)."""
    command = shlex.split(os.environ.get(CTL_ENV) or "rabbitmqctl")
    result = subprocess.run(command + list(args), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command + list(args))} failed: {result.stdout}{result.stderr}")
    return result.stdout


class RabbitNode:
    """One node. ``root``: the chroot of its install (None: the system's); ``home``: a
    folder (as the host sees it) to share the Erlang cookie with other nodes (a cluster)."""

    def __init__(self, root: str | None = "from-env", home: str | None = None, label: str = "test",
                 config: str = "", advanced: str = "") -> None:
        """``config``: lines added to its rabbitmq.conf (``consumer_timeout = 2000``);
        ``advanced``: the terms of its advanced.config's ``rabbit`` section, for settings
        rabbitmq.conf has no key for (``{channel_tick_interval, 500}``)."""
        self.root = install_root() if root == "from-env" else root
        scratch = os.path.join(self.root, "tmp") if self.root else None
        self.base = tempfile.mkdtemp(prefix="amqprpc-rabbit-", dir=scratch)
        self.home = home or self.base
        self.port = free_port()
        self.name = f"amqprpc-{label}-{os.getpid()}-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        settings = f"listeners.tcp.local = 127.0.0.1:{self.port}\n"  # replaces the system's 5672
        if self.root:
            # No /proc inside the chroot (nothing is mounted into the cached folder): take the
            # memory figures from the Erlang allocators instead.
            settings += "vm_memory_calculation_strategy = allocated\ntotal_memory_available_override_value = 4GB\n"
        with open(os.path.join(self.base, "rabbitmq.conf"), "w") as conf:
            conf.write(settings + config)
        with open(os.path.join(self.base, "advanced.config"), "w") as conf:
            conf.write(f"[{{rabbit, [{advanced}]}}].\n")
        with open(os.path.join(self.base, "enabled_plugins"), "w") as plugins:
            plugins.write("[].\n")
        inside = self._inside
        self.env = {
            "HOME": inside(self.home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": inside(os.path.join(self.base, "rabbitmq.conf")),
            "RABBITMQ_ADVANCED_CONFIG_FILE": inside(os.path.join(self.base, "advanced.config")),
            "RABBITMQ_CONF_ENV_FILE": inside(os.path.join(self.base, "rabbitmq-env.conf")),
            "RABBITMQ_MNESIA_BASE": inside(os.path.join(self.base, "mnesia")),
            "RABBITMQ_LOG_BASE": inside(os.path.join(self.base, "log")),
            "RABBITMQ_PID_FILE": inside(os.path.join(self.base, "node.pid")),
            "RABBITMQ_ENABLED_PLUGINS_FILE": inside(os.path.join(self.base, "enabled_plugins")),
        }

    def save(self, path: str) -> None:
        """Write what :meth:`attach` needs to find this node again, from another process."""
        with open(path, "w") as state:
            json.dump(vars(self), state)

    @classmethod
    def attach(cls, path: str) -> "RabbitNode":
        """The node another process started and wrote to ``path`` with :meth:`save`."""
        node = cls.__new__(cls)
        with open(path) as state:
            vars(node).update(json.load(state))
        return node

    def _inside(self, path: str) -> str:
        """``path`` as the node sees it (relative to its chroot)."""
        return "/" + os.path.relpath(path, self.root) if self.root else path

    def _run(self, tool: str, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        command = [f"{RABBIT_BIN}/{tool}", *args]
        if self.root:
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", **self.env}
            command = ["chroot", self.root, *command]
        else:
            env = {**os.environ, **self.env}
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} on {self.name} failed: {result.stdout}{result.stderr}")
        return result

    def ctl(self, *args: str, timeout: float = 60) -> str:
        return self._run("rabbitmqctl", "-n", self.name, *args, timeout=timeout).stdout

    def ctl_command(self) -> str:
        """A shell command prefix running rabbitmqctl against this node (for CTL_ENV)."""
        env = [f"{key}={value}" for key, value in self.env.items() if key == "HOME"]
        prefix = ["chroot", self.root, "env", "LC_ALL=C.UTF-8"] if self.root else ["env"]
        return shlex.join(prefix + env + [f"{RABBIT_BIN}/rabbitmqctl", "-n", self.name])

    def version(self) -> str:
        with Connection(self.url, connect_timeout=5) as conn:
            conn.connect()
            return conn.connection.server_properties.get("version", "?")

    def start(self, timeout: float = 120) -> None:
        self.boot()
        self.wait_up(timeout)

    def boot(self) -> None:
        """``rabbitmq-server -detached``: returns at once, the node boots on (:meth:`wait_up`)."""
        self._run("rabbitmq-server", "-detached", timeout=30)

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

    @property
    def os_pid(self) -> int | None:
        try:
            with open(os.path.join(self.base, "node.pid")) as handle:
                return int(handle.read().strip())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        pid = self.os_pid
        return bool(pid) and _alive(pid)

    def kill(self) -> None:
        """kill -9 the node's Erlang VM (a node failure, not a stop)."""
        pid = self.os_pid
        assert pid, f"no pid file for {self.name}"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.unlink(os.path.join(self.base, "node.pid"))

    def halt(self) -> None:
        """Stop the node's Erlang VM the orderly way (``rabbitmqctl stop``), keeping its data."""
        self.ctl("stop", timeout=60)
        pid = self.os_pid
        deadline = time.monotonic() + 30
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        try:
            if self.running:
                try:
                    self.ctl("stop", timeout=60)
                except Exception:  # noqa: BLE001 - it must go either way
                    os.kill(self.os_pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (the detached node is nobody's child here) counts as gone
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


class RabbitCluster:
    """``size`` nodes of one install on this machine, joined into one cluster with
    ``join_cluster``; ``url`` lists them all for failover (``amqp://n1;amqp://n2;...``)."""

    def __init__(self, size: int = 3, root: str | None = "from-env") -> None:
        root = install_root() if root == "from-env" else root
        self.home = tempfile.mkdtemp(prefix="amqprpc-cluster-", dir=os.path.join(root, "tmp") if root else None)
        self.nodes = [RabbitNode(root, home=self.home, label=f"cluster{n}") for n in range(size)]

    @property
    def url(self) -> str:
        return ";".join(node.url for node in self.nodes)

    def start(self) -> None:
        """Boot the nodes side by side (a boot is mostly waiting: ~16 s instead of ~24 s for three
        3.10 nodes here), then join the others to the first, one at a time."""
        try:
            for node in self.nodes:
                node.boot()
            for node in self.nodes:
                node.wait_up(120)
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.name)
                node.start_app()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stopping = [threading.Thread(target=node.stop) for node in self.nodes]  # side by side too
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join()
        shutil.rmtree(self.home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a command against a RabbitMQ node of its own.")
    parser.add_argument("--root", default=install_root(), help="chroot of the install (default: the system's)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    node = RabbitNode(args.root, label="suite")
    began = time.monotonic()
    node.start()
    print(f"rabbit_node: RabbitMQ {node.version()} node {node.name} on 127.0.0.1:{node.port} "
          f"(up in {time.monotonic() - began:.1f} s)", file=sys.stderr, flush=True)
    env = {**os.environ, "AMQPRPC_BROKER_URL": node.url, CTL_ENV: node.ctl_command()}
    if args.root:
        env[ROOT_ENV] = args.root
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return subprocess.call(command, env=env)
    finally:
        node.stop()


if __name__ == "__main__":
    sys.exit(main())
