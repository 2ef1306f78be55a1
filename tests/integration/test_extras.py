"""What needs an extra and what does not: a program that only calls runs without
prometheus_client and setproctitle ([metrics], [daemon]); a flag that needs a missing extra is
refused in one line, exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from amqprpc.testing import delete_queues, unique_name

ROOT = Path(__file__).resolve().parents[2]

# Run with the daemon extras made unimportable, as in a venv that installed plain "amqprpc".
WITHOUT_EXTRAS = "import sys; sys.modules['prometheus_client'] = sys.modules['setproctitle'] = None\n"

CALLER = WITHOUT_EXTRAS + r'''
import json
from amqprpc import CircuitBreaker, RpcClient, Service
from amqprpc.testing import running_worker

service = Service(sys.argv[1])
service.handler("echo")(lambda payload: payload)
with running_worker(service), RpcClient("no-extras", breaker=CircuitBreaker(shared=False)) as client:
    print(json.dumps(client.call(service.name, "echo", {"n": 1})))
'''


@pytest.mark.integration
def test_a_caller_and_an_in_process_worker_need_neither_extra(broker_url):
    name = unique_name("no-extras")
    try:
        result = subprocess.run([sys.executable, "-c", CALLER, name], capture_output=True, text=True, timeout=60, cwd=ROOT)
    finally:
        delete_queues(f"service.{name}.request")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"n": 1} and result.stderr == ""


def test_a_service_that_needs_a_missing_extra_is_one_line_naming_it_exit_2():
    """The shop's user-service with a base install (no pydantic): the extra to install, no traceback."""
    command = "import sys; sys.modules['pydantic'] = None\nfrom amqprpc.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", command, "worker", "user-service", "--broker-wait", "0",
                             "--broker", "amqp://guest:guest@127.0.0.1:1//", "--registry-interval", "0"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "Error: user-service needs pydantic, which is not installed: pip install 'amqprpc[pydantic]'"]


def test_metrics_port_without_prometheus_client_is_one_line_exit_2():
    command = WITHOUT_EXTRAS + "from amqprpc.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", command, "worker", "user-service", "--metrics-port", "9",
                             "--broker", "amqp://guest:guest@127.0.0.1:1//", "--registry-interval", "0"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error.startswith("Error: --metrics-port needs prometheus_client (")
    assert error.endswith("): pip install 'amqprpc[metrics]'") and "Traceback" not in result.stderr
    # and without setproctitle the worker had gone on with its title unchanged, saying why
    assert "process title not set: setproctitle is not installed (pip install 'amqprpc[daemon]')" in result.stderr
