"""The shipped systemd units: `systemd-analyze verify` (paths templated for this machine) for
an instance of the template per shipped service; and the unit's ExecStart run as systemd
would (its Environment=, WorkingDirectory=, a NOTIFY_SOCKET, WATCHDOG_USEC) before the
broker is up: it waits, says so, extends its start timeout, and is READY once the broker is.

Not tested here, for want of systemd as PID 1: systemd's own handling of these (restart on
failure, RestartPreventExitStatus, TimeoutStartSec and its extension, unit ordering). What
can be checked without it is: the exit codes the worker gives for each case against the
unit's Restart= rules, and what it sends on the notify socket."""
from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amqprpc import RpcClient, ServiceUnavailable
from amqprpc.ops.loading import load_service  # noqa: F401 - the services named below must load
from amqprpc.testing import delete_queues, wait_for

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
TEMPLATE = UNITS / "amqprpc-worker@.service"
SHIPPED_SERVICES = sorted(path.stem for path in (ROOT / "supervisor").glob("*.conf")
                          if path.stem not in ("amqprpc-dashboard", "amqprpc-beat"))  # not a worker: tests/integration/test_dashboard_deploy.py


def unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str
    parser.read(path)
    return parser


def unit_environment(service: configparser.SectionProxy) -> dict[str, str]:
    """Every ``Environment=KEY=VALUE`` line of the unit (the parser keeps the last of a
    repeated key, so read the file's lines)."""
    found = {}
    for line in TEMPLATE.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line[len("Environment="):].partition("=")
            found[key] = value
    return found


def test_template_has_what_a_safe_stop_needs():
    service = unit(TEMPLATE)["Service"]
    assert service["Type"] == "notify" and service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert service["Restart"] == "on-failure" and service["EnvironmentFile"] == "-/etc/amqprpc/%i.env"
    # No option flags: each would override the variable the EnvironmentFile may set.
    assert service["ExecStart"].split()[1:] == ["worker", "%i"]
    assert float(service["TimeoutStopSec"]) > float(unit_environment(service)["AMQPRPC_SHUTDOWN_TIMEOUT"])
    assert service["RestartPreventExitStatus"].split() == ["2"]
    for hardening in ("NoNewPrivileges", "PrivateTmp"):
        assert service[hardening] == "true"
    assert service["ProtectSystem"] == "strict"
    assert unit(TEMPLATE)["Install"]["WantedBy"] == "amqprpc-shop.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt-get install systemd)")
def test_systemd_analyze_verify(tmp_path):
    text = TEMPLATE.read_text().replace("/opt/amqprpc/venv/bin/amqprpc", str(Path(sys.executable).parent / "amqprpc"))
    (tmp_path / TEMPLATE.name).write_text(text)
    targets = []
    for path in UNITS.glob("*.target"):
        shutil.copy(path, tmp_path / path.name)
        targets.append(tmp_path / path.name)
    instances = []
    for name in SHIPPED_SERVICES:
        instance = tmp_path / f"amqprpc-worker@{name}.service"
        instance.symlink_to(TEMPLATE.name)
        instances.append(instance)
    assert instances and targets
    result = subprocess.run(["systemd-analyze", "verify", *map(str, instances + targets)],
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys or bad values are only warnings to verify: none may mention our units.
    assert "amqprpc" not in output, output


def exec_start(instance: str) -> list[str]:
    """The unit's ExecStart for ``instance``, with this venv's amqprpc."""
    words = unit(TEMPLATE)["Service"]["ExecStart"].replace("%i", instance).split()
    return [str(Path(sys.executable).parent / "amqprpc"), *words[1:]]


def as_systemd_would(tmp_path: Path, broker_url: str, **extra: str) -> dict[str, str]:
    """The environment the unit gives the worker (Environment=, then what the
    EnvironmentFile would set: the broker), the notify socket and watchdog of Type=notify."""
    service = unit(TEMPLATE)["Service"]
    return {**os.environ, **unit_environment(service), "AMQPRPC_BROKER_URL": broker_url,
            "AMQPRPC_REGISTRY_INTERVAL": "0", "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
            "WATCHDOG_USEC": str(int(float(service["WatchdogSec"]) * 1e6)), **extra}


def restarted(code: int) -> bool:
    """Whether systemd restarts a unit whose main process exited with ``code``, by the
    template's Restart=on-failure and RestartPreventExitStatus=."""
    service = unit(TEMPLATE)["Service"]
    assert service["Restart"] == "on-failure"
    return code != 0 and str(code) not in service["RestartPreventExitStatus"].split()


@pytest.mark.integration
def test_exit_codes_against_the_units_restart_rules(tmp_path):
    usage = subprocess.run(exec_start("no-such-service"), env=as_systemd_would(tmp_path, "amqp://127.0.0.1:1//"),
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and not restarted(usage.returncode), usage.stderr  # not restarted in a loop
    # cwd: the unit's WorkingDirectory, a checkout holding the shop (workers/ is not installed)
    gave_up = subprocess.run(exec_start("user-service"), cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env=as_systemd_would(tmp_path, "amqp://127.0.0.1:1//", AMQPRPC_BROKER_WAIT="0"))
    assert gave_up.returncode == 4 and restarted(gave_up.returncode), gave_up.stderr


@pytest.mark.integration
def test_the_units_worker_waits_for_a_late_broker_and_tells_systemd(own_broker, tmp_path):
    service = unit(TEMPLATE)["Service"]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(1.0)
    states: list[str] = []
    log = tmp_path / "worker.log"

    def count(prefix: str) -> int:
        return sum(state.startswith(prefix) for state in states)

    def read_until(done, timeout: float, running: bool = True) -> None:
        """Receive what the worker tells systemd until ``done()``; fail if it exits (while ``running``)."""
        deadline = time.monotonic() + timeout
        while not done():
            assert not running or worker.poll() is None, f"the worker exited {worker.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"not done within {timeout}s; received {states}"
            try:
                states.extend(notify.recv(4096).decode().splitlines())
            except socket.timeout:
                pass

    own_broker.stop_app()
    try:
        with open(log, "w") as output:
            worker = subprocess.Popen(exec_start("user-service"), cwd=ROOT, stdout=output, stderr=output,
                                      env=as_systemd_would(tmp_path, own_broker.url, AMQPRPC_RECONNECT_CAP="1"))
        read_until(lambda: count("EXTEND_TIMEOUT_USEC=") >= 3, timeout=30)
    finally:
        own_broker.start_app()
    try:
        assert count("STATUS=amqprpc worker user-service: waiting for the broker amqp://guest:***@") >= 3, states
        assert count("READY=1") == 0 and count("WATCHDOG=1") >= 3  # alive, not serving yet
        # Each extension covers the wait for the next attempt (<= 1 s here) and the attempt (5 s).
        assert all(int(state.split("=")[1]) > 6e6 for state in states if state.startswith("EXTEND_TIMEOUT_USEC="))
        read_until(lambda: count("READY=1") == 1, timeout=float(service["TimeoutStartSec"]))
        with RpcClient("systemd-test", broker_url=own_broker.url) as client:
            def served() -> bool:
                try:
                    return client.call("user-service", "ping", timeout=10)["pid"] == worker.pid
                except ServiceUnavailable:
                    return False
            wait_for(served, timeout=30)
        worker.send_signal(getattr(signal, service["KillSignal"]))
        assert worker.wait(float(service["TimeoutStopSec"])) == 0, log.read_text()
        read_until(lambda: count("STOPPING=1") >= 1, timeout=5, running=False)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        notify.close()
        delete_queues("service.user-service.request", broker_url=own_broker.url)


@pytest.mark.integration
def test_the_units_worker_with_processes_is_ready_once_every_child_serves(broker_url, tmp_path):
    """AMQPRPC_PROCESSES=2 in the unit's environment: the parent (the unit's main process,
    NotifyAccess=main) sends READY=1 once both children serve, with MAINPID its own pid;
    the children never talk to systemd; KillSignal stops it warmly with exit 0."""
    from amqprpc.testing import unique_name

    name = unique_name("systemd-prefork")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(1.0)
    states: list[str] = []
    senders: set = set()
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    service = unit(TEMPLATE)["Service"]
    log = tmp_path / "worker.log"
    env = as_systemd_would(tmp_path, broker_url, AMQPRPC_PROCESSES="2", AMQPRPC_APP="tasks_app:service",
                           AMQPRPC_TEST_SERVICE=name,
                           PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "apps"), os.environ.get("PYTHONPATH", "")]))

    def read_until(done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"not done within {timeout}s; received {states}: {log.read_text()}"
            try:
                data, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
            except socket.timeout:
                continue
            states.extend(data.decode().splitlines())
            for level, kind, cred in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    senders.add(int.from_bytes(cred[:4], "little"))

    with open(log, "w") as output:
        worker = subprocess.Popen(exec_start(name), cwd=tmp_path, stdout=output, stderr=output, env=env)
    try:
        read_until(lambda: "READY=1" in states, timeout=30)
        assert f"MAINPID={worker.pid}" in states
        ready = [line for line in log.read_text().splitlines() if '"child ready"' in line]
        assert len(ready) == 2, log.read_text()  # both served before READY
        with RpcClient("systemd-prefork-test", broker_url=broker_url) as client:
            assert client.call(name, "ping", timeout=10)["pid"] != worker.pid  # a child answers
        worker.send_signal(getattr(signal, service["KillSignal"]))
        assert worker.wait(float(service["TimeoutStopSec"])) == 0, log.read_text()
        read_until(lambda: "STOPPING=1" in states, timeout=5)
        assert senders == {worker.pid}, (senders, worker.pid)  # the parent alone spoke to systemd
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        notify.close()
        delete_queues(f"service.{name}.request", broker_url=broker_url)
