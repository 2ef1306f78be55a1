"""Every program file shipped in supervisor/ runs under a real supervisord (from PyPI),
paths templated for this machine, against this session's own RabbitMQ node (so the
shipped service names cannot collide with other test runs on the shared broker): all
answer, kill -9 restarts, stop is warm; and workers started before their broker (stopped
here) serve once it is up, never going FATAL."""
from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from amqprpc import RpcClient, ServiceUnavailable
from amqprpc.config import redis_url
from amqprpc.testing import delete_queues, unique_name, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_FILE = ROOT / "supervisor" / "amqprpc-dashboard.conf"  # not a worker: test_dashboard_deploy.py
BEAT_FILE = ROOT / "supervisor" / "amqprpc-beat.conf"  # not a worker: tests/integration/test_beat.py
PROGRAM_FILES = sorted(path for path in (ROOT / "supervisor").glob("*.conf") if path not in (DASHBOARD_FILE, BEAT_FILE))
BIN = Path(sys.executable).parent


def programs(path: Path) -> dict[str, configparser.SectionProxy]:
    parser = configparser.RawConfigParser()
    parser.read(path)
    return {name.split(":", 1)[1]: parser[name] for name in parser.sections() if name.startswith("program:")}


def environment(program: configparser.SectionProxy) -> dict[str, str]:
    """Supervisor's ``environment=KEY="value",...``."""
    return dict(re.findall(r'(\w+)="([^"]*)"', program["environment"]))


@pytest.mark.parametrize("path", PROGRAM_FILES, ids=lambda p: p.name)
def test_program_file_follows_the_rules(path):
    found = programs(path)
    assert found, f"{path.name} has no [program:...] section"
    for name, program in found.items():
        command = shlex.split(program["command"])
        # No option flags: each would override its AMQPRPC_* variable without a word.
        assert Path(command[0]).name == "amqprpc" and command[1:] == ["worker", name]
        assert program["process_name"] == "%(program_name)s-%(process_num)02d" and int(program["numprocs"]) >= 1
        assert program["stopsignal"] == "TERM"
        env = environment(program)
        assert float(program["stopwaitsecs"]) > float(env["AMQPRPC_SHUTDOWN_TIMEOUT"])
        assert program["stopasgroup"] == "false" and program["killasgroup"] == "true"
        assert program["autorestart"] == "true" and int(program["startsecs"]) >= 1
        assert "AMQPRPC_BROKER_URL" in env and "AMQPRPC_BROKER_WAIT" not in env  # daemons wait for their broker


def template(path: Path, tmp: Path, broker_url: str, shop_prefix: str) -> Path:
    """The shipped file with this machine's paths: the venv's amqprpc, logs under tmp,
    the test broker, Redis keys of this test's own, no user switch."""
    parser = configparser.RawConfigParser()
    parser.read(path)
    for section in parser.sections():
        program = parser[section]
        words = shlex.split(program["command"])
        words[0] = str(BIN / "amqprpc")
        program["command"] = shlex.join(words)
        program["directory"] = str(ROOT)  # /opt/amqprpc: the checkout, where the shop's workers/ is found
        program.pop("user", None)
        program["environment"] = re.sub(r'AMQPRPC_BROKER_URL="[^"]*"', f'AMQPRPC_BROKER_URL="{broker_url}"',
                                        program["environment"])
        program["environment"] += f',AMQPRPC_SHOP_PREFIX="{shop_prefix}",AMQPRPC_REGISTRY_PREFIX="{shop_prefix}registry"'
        program["stdout_logfile"] = str(tmp / "logs" / Path(program["stdout_logfile"]).name)
    out = tmp / "conf.d" / path.name
    with open(out, "w") as handle:
        parser.write(handle)
    return out


@pytest.fixture
def start_supervisord(own_broker, tmp_path):
    """``start(program files)``: a supervisord running them (templated), as ``ctl(*args)``
    (supervisorctl); shut down, queues and Redis keys deleted, after the test."""
    started = []
    prefix = unique_name("amqprpc-test-shop") + ":"  # the shop's and the registry's Redis keys

    def start(paths: list[Path]):
        ctl, process = _supervisord(tmp_path, paths, own_broker.url, prefix)
        started.append((ctl, process, paths))
        return ctl

    yield start
    for ctl, process, paths in started:
        ctl("shutdown")
        try:
            process.wait(60)
        finally:
            if process.poll() is None:
                process.kill()
        own_broker.ensure_running()
        for path in paths:
            delete_queues(*(f"service.{name}.request" for name in programs(path)), broker_url=own_broker.url)
    shared_redis = redis.Redis.from_url(redis_url())
    for key in shared_redis.scan_iter(f"{prefix}*"):
        shared_redis.delete(key)


@pytest.fixture
def supervisord(start_supervisord):
    return start_supervisord(PROGRAM_FILES)


def _supervisord(tmp_path: Path, paths: list[Path], broker_url: str, prefix: str):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "logs").mkdir()
    for path in paths:
        template(path, tmp_path, broker_url, prefix)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"""\
[unix_http_server]
file={tmp_path}/supervisor.sock

[supervisord]
logfile={tmp_path}/supervisord.log
pidfile={tmp_path}/supervisord.pid
childlogdir={tmp_path}/logs

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{tmp_path}/supervisor.sock

[include]
files = {tmp_path}/conf.d/*.conf
""")
    process = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ctl(*args: str) -> str:
        return subprocess.run([str(BIN / "supervisorctl"), "-c", str(conf), *args], capture_output=True,
                              text=True, timeout=60).stdout

    ctl.log = tmp_path / "supervisord.log"
    ctl.logs = tmp_path / "logs"
    return ctl, process


def statuses(ctl) -> dict[str, tuple[str, str]]:
    """process name -> (state, rest of the line)."""
    out = {}
    for line in ctl("status").splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return out


def all_running(ctl) -> dict | None:
    found = statuses(ctl)
    return found if found and all(state == "RUNNING" for state, _ in found.values()) else None


def answers(client: RpcClient, service: str) -> bool:
    try:
        return bool(client.call(service, "ping", timeout=10))
    except ServiceUnavailable:  # no queue yet: the worker is still starting
        return False


def test_supervisord_runs_restarts_and_stops_every_shipped_worker(own_broker, supervisord):
    names = [name for path in PROGRAM_FILES for name in programs(path)]
    running = wait_for(lambda: all_running(supervisord), timeout=60)
    assert {process.split(":")[0] for process in running} == set(names)

    with RpcClient("supervisor-test", broker_url=own_broker.url) as client:
        # RUNNING means "up for startsecs", not "consuming": under load a worker may still be
        # connecting. Every service must answer within a deadline.
        for name in names:
            wait_for(lambda: answers(client, name), timeout=30)

        # kill -9 of a worker: Supervisor starts a new one, which answers.
        victim = f"{names[0]}:{names[0]}-00"
        old_pid = int(supervisord("pid", victim))
        os.kill(old_pid, 9)
        wait_for(lambda: supervisord("pid", victim).strip() not in ("", "0", str(old_pid)), timeout=30)
        wait_for(lambda: all_running(supervisord), timeout=60)
        wait_for(lambda: answers(client, names[0]), timeout=30)

    # supervisorctl stop: SIGTERM, a warm stop, exit 0, long before stopwaitsecs.
    began = time.monotonic()
    out = supervisord("stop", "all")
    assert time.monotonic() - began < 20, out
    assert all(state == "STOPPED" for state, _ in statuses(supervisord).values())
    log = supervisord.log.read_text()
    for process in running:
        short = process.split(":")[1]
        assert f"stopped: {short} (exit status 0)" in log, log
        lines = [json.loads(line) for line in (supervisord.logs / f"{short}.log").read_text().splitlines()
                 if line.startswith("{")]
        assert [line["exit_code"] for line in lines if line["event"] == "worker exiting"][-1] == 0
        assert [line["clean"] for line in lines if line["event"] == "worker stopped"][-1] is True


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")] if path.exists() else []


def test_workers_started_before_their_broker_serve_once_it_is_up(own_broker, start_supervisord):
    """The broker boots after its workers (as after a power cut): the shipped program file's
    workers stay RUNNING, logging each attempt, and serve once RabbitMQ is up, with no
    operator action. (Before: exit 4 at once, FATAL after startretries, the shop dead.)"""
    path = ROOT / "supervisor" / "user-service.conf"
    own_broker.stop_app()
    try:
        supervisord = start_supervisord([path])
        logs = [supervisord.logs / f"user-service-0{n}.log" for n in range(int(programs(path)["user-service"]["numprocs"]))]

        def waiting_past_startsecs() -> bool:
            attempts = [[line for line in json_lines(log) if line["event"] == "broker connect failed"] for log in logs]
            return bool(all_running(supervisord)) and all(len(tried) >= 3 for tried in attempts)

        wait_for(waiting_past_startsecs, timeout=60)  # RUNNING: up for startsecs already, and still trying
        assert "exited:" not in supervisord.log.read_text()
    finally:
        own_broker.start_app()
    pids = {int(supervisord("pid", f"user-service:user-service-0{n}")) for n in range(len(logs))}
    served: set = set()
    with RpcClient("supervisor-late-test", broker_url=own_broker.url) as client:
        def every_worker_served() -> bool:
            try:
                served.add(client.call("user-service", "ping", timeout=10)["pid"])
            except ServiceUnavailable:  # no queue yet: not reconnected
                pass
            return served == pids

        wait_for(every_worker_served, timeout=60, interval=0.1)
    assert "exited:" not in supervisord.log.read_text()  # the same processes, never restarted
    supervisord("stop", "all")
    log = supervisord.log.read_text()
    assert all(f"stopped: user-service-0{n} (exit status 0)" in log for n in range(len(logs))), log
