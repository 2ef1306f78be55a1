"""The dashboard's Supervisor program file and systemd unit: the rules a safe daemon needs
(as the workers' files follow them), ``systemd-analyze verify``, and the program file run by
a real supervisord (serving, kill -9 restarted, stopped warm)."""
from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from amqprpc.testing import unique_name, wait_for

from procs import free_port
from test_supervisor import _supervisord, environment, programs, statuses

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ROOT / "supervisor" / "amqprpc-dashboard.conf"
UNIT = ROOT / "systemd" / "amqprpc-dashboard.service"


def unit() -> configparser.SectionProxy:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"]


def test_the_program_file_runs_the_dashboard_on_loopback_with_a_warm_stop():
    program = programs(PROGRAM)["amqprpc-dashboard"]
    assert shlex.split(program["command"])[1:] == ["dashboard"]  # every option from the environment
    env = environment(program)
    assert env["AMQPRPC_DASHBOARD_HOST"] == "127.0.0.1" and "AMQPRPC_BROKER_URL" in env
    assert "AMQPRPC_BROKER_WAIT" not in env  # it waits for a late broker, as the workers do
    assert program["stopsignal"] == "TERM" and program["stopasgroup"] == "false" and program["killasgroup"] == "true"
    assert program["autorestart"] == "unexpected" and "2" in program["exitcodes"].split(",")  # no loop on usage errors


def test_the_unit_is_a_notify_service_that_does_not_restart_on_usage_errors():
    service = unit()
    assert service["Type"] == "notify" and service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert service["ExecStart"].split()[1:] == ["dashboard"] and service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"].split() == ["2"]
    assert "AMQPRPC_DASHBOARD_HOST=127.0.0.1" in UNIT.read_text()
    assert service["NoNewPrivileges"] == "true" and service["ProtectSystem"] == "strict"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt-get install systemd)")
def test_systemd_analyze_verify(tmp_path):
    text = UNIT.read_text().replace("/opt/amqprpc/venv/bin/amqprpc", str(Path(sys.executable).parent / "amqprpc"))
    (tmp_path / UNIT.name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / UNIT.name)], capture_output=True,
                            text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "amqprpc" not in output, output


@pytest.mark.integration
def test_supervisord_runs_restarts_and_stops_the_dashboard(tmp_path, broker_url):
    port = free_port()
    prefix = unique_name("dash-registry")
    text = PROGRAM.read_text().replace('AMQPRPC_DASHBOARD_PORT="8765"', f'AMQPRPC_DASHBOARD_PORT="{port}"')
    text = re.sub(r'AMQPRPC_BROKER_URL="[^"]*"', f'AMQPRPC_BROKER_URL="{broker_url}"', text)
    source = tmp_path / "source"
    source.mkdir()
    (source / PROGRAM.name).write_text(text)
    work = tmp_path / "supervisor"
    work.mkdir()
    ctl, process = _supervisord(work, [source / PROGRAM.name], broker_url, prefix + ":")

    def serving() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/snapshot", timeout=2) as answer:
                return "services" in json.loads(answer.read())
        except OSError:
            return False

    try:
        wait_for(lambda: statuses(ctl).get("amqprpc-dashboard", ("",))[0] == "RUNNING", timeout=30)
        wait_for(serving, timeout=20)
        pid = int(ctl("pid", "amqprpc-dashboard").strip())
        os.kill(pid, signal.SIGKILL)  # restarted by supervisord
        wait_for(lambda: ctl("pid", "amqprpc-dashboard").strip() not in ("", "0", str(pid)), timeout=30)
        wait_for(serving, timeout=20)
        ctl("stop", "amqprpc-dashboard")
        assert statuses(ctl)["amqprpc-dashboard"][0] == "STOPPED"
        log = (work / "logs" / "amqprpc-dashboard.log").read_text()
        assert '"exit_code": 0' in log and "dashboard exiting" in log
    finally:
        ctl("shutdown")
        process.wait(60)
