"""The README's worker and call, a cast, and an event, as a new user runs them on any supported
Python: the installed ``amqprpc`` command in real processes, on this session's own RabbitMQ node
(the shop's service names are free there), plus the client in this interpreter.
``make test-pythons`` runs this with the unit tests on every Python but the default one."""
from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import pytest

from amqprpc import RpcClient
from amqprpc.testing import delete_queues, wait_for
from procs import Proc

pytestmark = [pytest.mark.integration, pytest.mark.smoke]

AMQPRPC = str(Path(sys.executable).parent / "amqprpc")
ROOT = Path(__file__).resolve().parents[2]

AUDIT = """
import json
from amqprpc import Service

service = Service("audit-service")


@service.event("user.*")
def on_user(payload: dict) -> None:
    with open("events.log", "a") as log:
        log.write(json.dumps(payload) + "\\n")


@service.handler
def echo(payload: dict) -> dict:
    return payload
"""


def test_worker_call_cast_and_event_from_the_installed_command(own_broker, tmp_path):
    own_broker.ensure_running()
    shutil.copytree(ROOT / "workers", tmp_path / "workers")  # a checkout's shop (not in the wheel)
    (tmp_path / "myshop").mkdir()
    (tmp_path / "myshop" / "audit.py").write_text(AUDIT)
    env = {"AMQPRPC_BROKER_URL": own_broker.url, "AMQPRPC_REGISTRY_INTERVAL": "0"}

    def amqprpc(*args: str) -> str:
        command = Proc([AMQPRPC, *args], env=env, cwd=str(tmp_path))
        assert command.process.wait(30) == 0, command.output
        return command.output

    workers = [Proc([AMQPRPC, "worker", "user-service", "--log-format", "json"], env=env, cwd=str(tmp_path)),
               Proc([AMQPRPC, "worker", "audit-service", "--app", "myshop.audit:service", "--log-format", "json"],
                    env=env, cwd=str(tmp_path))]
    try:
        for worker in workers:
            worker.wait_for_line('"worker ready"', timeout=30)
        assert json.loads(amqprpc("call", "user-service", "get_user", '{"user_id": "user_001"}'))["name"] == "Alice Zhang"
        assert amqprpc("cast", "user-service", "touch", '{"user_id": "user_001"}').strip() == "sent"
        assert amqprpc("publish", "user.seen", '{"user_id": "user_001"}').strip() == "published"
        events = tmp_path / "events.log"
        wait_for(lambda: events.exists() and events.read_text())
        with RpcClient("smoke", broker_url=own_broker.url) as client:
            wait_for(lambda: client.call("user-service", "last_seen", {"user_id": "user_001"})["last_seen"])
            assert client.call("audit-service", "echo", {"n": 1}) == {"n": 1}
            client.publish_event("user.left", {"user_id": "user_002"})
        wait_for(lambda: len(events.read_text().splitlines()) == 2)
        assert [json.loads(line) for line in events.read_text().splitlines()] == [{"user_id": "user_001"},
                                                                                  {"user_id": "user_002"}]
        for worker in workers:
            assert worker.stop(signal.SIGTERM) == 0, worker.output
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.stop(signal.SIGKILL)
        delete_queues("service.user-service.request", "service.audit-service.request",
                      "service.audit-service.event.on_user", broker_url=own_broker.url)
