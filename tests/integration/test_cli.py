"""The amqprpc command: help, exit codes, and the real worker process answering real calls."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from amqprpc.cli import main

AMQPRPC = [sys.executable, "-m", "amqprpc"]


@pytest.mark.parametrize("command", [[], ["worker"], ["call"], ["cast"], ["publish"], ["demo"]])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, command + ["--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_bad_payload_is_a_usage_error_exit_2():
    result = CliRunner().invoke(main, ["call", "user-service", "get_user", "[1]"])
    assert result.exit_code == 2 and "must be a JSON object" in result.output


def test_help_never_shows_the_default_password():
    assert "guest:guest" not in CliRunner().invoke(main, ["worker", "--help"]).output


@pytest.mark.parametrize("command", ["cast", "publish"])
def test_cast_and_publish_timeout_is_the_brokers_confirm(command):
    output = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
    assert "Seconds to wait for the broker to confirm it stored the message." in output
    assert "for the answer" not in output


def test_worker_help_says_what_each_option_does_without_guessing():
    output = " ".join(CliRunner().invoke(main, ["worker", "--help"]).output.split())
    assert "?" not in output
    assert "--broker-wait SECONDS" in output and "AMQPRPC_BROKER_WAIT" in output


ROOT = Path(__file__).resolve().parents[2]

def run(*args, timeout=20, env=None):
    return subprocess.run(AMQPRPC + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)  # the checkout: where the shop is


@pytest.mark.integration
def test_unreachable_broker_is_one_line_with_password_redacted():
    result = run("call", "user-service", "get_user", "--broker", "amqp://bob:topsecret@127.0.0.1:1//")
    assert result.returncode == 4
    assert "topsecret" not in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def user_service_worker(broker_url):
    process = subprocess.Popen(AMQPRPC + ["worker", "user-service", "--log-format", "json"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = ""
    deadline = time.monotonic() + 20
    while "worker ready" not in line and time.monotonic() < deadline:
        line = process.stdout.readline()
    assert "worker ready" in line, "worker did not start"
    yield process
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0


@pytest.mark.integration
def test_worker_and_call_get_user(user_service_worker):
    result = run("call", "user-service", "get_user", '{"user_id": "user_001"}')
    assert result.returncode == 0, result.stderr
    assert '"name": "Alice Zhang"' in result.stdout


@pytest.mark.integration
def test_short_token_exits_1_with_invalid_token(user_service_worker):
    result = run("call", "user-service", "validate_token", '{"token": "short"}')
    assert result.returncode == 1 and "Invalid token" in result.stderr


@pytest.mark.integration
def test_unknown_action_exits_1_naming_it(user_service_worker):
    result = run("call", "user-service", "no_such_action")
    assert result.returncode == 1 and "no_such_action" in result.stderr


def test_demo_with_redis_down_exits_4_saying_how_to_start_it():
    result = run("demo", env={"AMQPRPC_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 4 and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: Redis does not answer at redis://127.0.0.1:1/0")
    assert "redis-server --daemonize yes" in result.stderr


@pytest.mark.integration
def test_unknown_service_exits_4_at_once_not_at_its_timeout(broker_url):
    started = time.monotonic()
    result = run("call", "no-such-service", "get_user", "--timeout", "30", timeout=40)
    assert result.returncode == 4
    # Far below the call's 30 s timeout; not a tight figure, which a loaded machine's Python
    # start-up alone (1.5-3.5 s measured) would break.
    assert time.monotonic() - started < 10.0


@pytest.mark.integration
def test_demo_runs_the_scenario(broker_url, redis_available):
    import re

    import redis
    from kombu import Connection

    result = run("demo", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Alice Zhang" in result.stdout and "Invalid token" in result.stdout
    # The order fans out: payment, inventory, order status and notifications, one trace.
    for shown in ("event order.created", "event payment.completed", "completed: 99.80", "reservation committed",
                  "98 left in stock", "order paid", "sent: Order o-", "went through: 99.80"):
        assert shown in result.stdout, shown
    assert "MIXED" not in result.stdout
    assert "Demo finished" in result.stdout
    # ... and the demo took away what it declared and stored.
    namespace = re.search(r"queues under (amqprpc-demo-[0-9a-f]+)\.", result.stdout).group(1)
    assert not list(redis.Redis().scan_iter(match=namespace + ":*"))
    with Connection(broker_url) as conn:
        with pytest.raises(conn.channel_errors):
            conn.channel().queue_declare(f"{namespace}.service.order-service.request", passive=True)
