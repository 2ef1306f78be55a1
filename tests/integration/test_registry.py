"""The service registry in Redis: real worker processes register, heartbeat, deregister on a
graceful stop and are ignored once a kill -9 left their heartbeat stale; `amqprpc ping`."""
import json
import os
import signal
import subprocess
import sys

import pytest
import redis
from conftest import log_lines, wait_ready

from amqprpc import RpcClient, Service, Worker
from amqprpc.ops.registry import Registry
from amqprpc.testing import capture_logs, delete_queues, unique_name, wait_for

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"
APP = """
from amqprpc import Service
service = Service({name!r})
service.handler("echo")(lambda payload: payload)
"""


@pytest.fixture
def registry_env(redis_available, broker_url):
    """Environment of this test alone: its own registry key prefix (deleted after)."""
    prefix = unique_name("t6:registry")
    yield {"AMQPRPC_REGISTRY_PREFIX": prefix, "AMQPRPC_REDIS_URL": REDIS_URL, "AMQPRPC_BROKER_URL": broker_url}
    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(match=f"{prefix}:*"):
        r.delete(key)


def amqprpc(*args, env):
    return subprocess.run([sys.executable, "-m", "amqprpc", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})


def services_json(env, stale_after=60.0):
    result = amqprpc("services", "--json", "--stale-after", str(stale_after), env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def app_service(tmp_path):
    name = unique_name("reg")
    module = f"app_{name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(APP.format(name=name))
    yield name, f"{module}:service"
    delete_queues(f"service.{name}.request")


@pytest.mark.parametrize("command", ["services", "ping"])
def test_commands_have_help(command):
    from click.testing import CliRunner

    from amqprpc.cli import main

    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def registry_of(env, stale_after=60.0):
    """The same view as `amqprpc services`, in-process: cheap enough to poll."""
    return Registry(REDIS_URL, prefix=env["AMQPRPC_REGISTRY_PREFIX"], stale_after=stale_after)


def test_services_lists_a_live_worker_pings_it_and_drops_it_after_a_graceful_stop(
        broker_url, worker_processes, registry_env, app_service):
    name, app = app_service
    worker = worker_processes(name, "--app", app, "--registry-interval", "0.3", "--concurrency", "3",
                              env=registry_env)
    wait_ready(worker)
    registry = registry_of(registry_env)
    wait_for(lambda: registry.instances(name), timeout=10)
    with RpcClient("tests", broker_url=broker_url) as client:
        assert client.call(name, "echo", {"n": 1}) == {"n": 1}

    ping = amqprpc("ping", name, "--count", "2", env=registry_env)
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.count(f"pong from {name}") == 2 and " ms" in ping.stdout
    # the echo and two pings, once the next heartbeat carried them
    wait_for(lambda: registry.instances(name)[0]["stats"]["succeeded"] == 3, timeout=10)

    (entry,) = services_json(registry_env)[name]
    assert entry["pid"] == worker.pid and entry["concurrency"] == 3 and entry["service"] == name
    assert entry["heartbeat_age"] < 5 and entry["version"] and entry["host"]
    assert entry["stats"]["succeeded"] == 3
    assert entry["instance_id"] in ping.stdout

    table = amqprpc("services", env=registry_env)
    assert table.returncode == 0 and name in table.stdout and "HEARTBEAT" in table.stdout

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    # gone at once, not only after 60 s of staleness
    assert name not in services_json(registry_env, stale_after=60)


def test_a_killed_worker_is_ignored_once_its_heartbeat_is_stale_and_pruned(
        worker_processes, registry_env, app_service):
    name, app = app_service
    worker = worker_processes(name, "--app", app, "--registry-interval", "0.3", env=registry_env)
    wait_ready(worker)
    wait_for(lambda: registry_of(registry_env).instances(name), timeout=10)
    worker.kill()
    worker.wait(10)
    assert name in services_json(registry_env, stale_after=60)  # no heartbeat for a moment: still listed
    wait_for(lambda: not registry_of(registry_env, stale_after=1.5).instances(name), timeout=10)
    assert name not in services_json(registry_env, stale_after=1.5)
    assert not redis.Redis.from_url(REDIS_URL).hlen(f"{registry_env['AMQPRPC_REGISTRY_PREFIX']}:{name}")  # pruned


def test_a_worker_without_redis_serves_warns_once_and_registers_when_redis_comes(
        broker_url, redis_server, app_service):
    from conftest import free_port

    name, _ = app_service
    service = Service(name)
    service.handler("echo")(lambda payload: payload)
    port = free_port()
    registry = Registry(f"redis://127.0.0.1:{port}/0", prefix=unique_name("t6:registry"), timeout=2.0)
    worker = Worker(service, broker_url=broker_url, registry=registry, registry_interval=0.1)
    with capture_logs() as logged:
        worker.start()
        try:
            with RpcClient("tests", broker_url=broker_url) as client:
                assert client.call(name, "ping", {})["instance_id"] == worker.instance_id
                wait_for(lambda: len([line for line in logged if "registry" in line["event"]]) >= 1)
                redis_server(port)  # Redis comes (back): the next heartbeat registers
                wait_for(lambda: registry.instances(name), timeout=10)
                assert client.call(name, "echo", {"n": 1}) == {"n": 1}
        finally:
            worker.shutdown(5)
    assert registry.instances(name) == []
    # one warning for the whole outage, however many heartbeats failed (info lines may be
    # filtered by an earlier logs.configure in this process, so only warnings are counted)
    warnings = [line for line in logged if "registry" in line["event"] and line["log_level"] == "warning"]
    assert [line["event"] for line in warnings] == ["service registry unreachable; retrying every interval"], logged
