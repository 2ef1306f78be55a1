"""amqprpc beat (#22): three replicas, the leader killed mid-way, each tick runs exactly once;
--list; the shipped Supervisor and systemd files for it."""
from __future__ import annotations

import collections
import configparser
import importlib
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import redis

from amqprpc.config import redis_url
from amqprpc.middleware import Delivery, Middleware
from amqprpc.outcome import Outcome, OutcomeKind
from amqprpc.testing import running_worker, unique_name, wait_for

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests" / "apps"  # beat_app.py


class Ran(Middleware):
    """Which tick ids ran, and how many copies were dropped as duplicates."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.dropped = 0

    def after_handle(self, delivery: Delivery, outcome: Outcome) -> None:
        if outcome.kind is OutcomeKind.DONE:
            self.ran.append(str(delivery.message_id))
        elif outcome.kind is OutcomeKind.DEDUPLICATED:
            self.dropped += 1


def start_beat(name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "amqprpc", "beat", name, "--app", "beat_app:service",
                             "--log-format", "json", "--lease-ttl", "3", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(TESTS), "BEAT_TEST_SERVICE": name})


@pytest.mark.integration
def test_three_replicas_fire_each_tick_once_across_a_killed_leader(broker_url, redis_available, monkeypatch):
    name = unique_name("beat")
    monkeypatch.setenv("BEAT_TEST_SERVICE", name)
    monkeypatch.syspath_prepend(str(TESTS))
    sys.modules.pop("beat_app", None)
    service = importlib.import_module("beat_app").service
    store = redis.Redis.from_url(redis_url(), decode_responses=True)
    leader_key = f"amqprpc:beat:{name}:leader"
    ran = Ran()
    beats: list[subprocess.Popen] = []
    try:
        with running_worker(service, broker_url=broker_url, middleware=[ran]) as worker:
            beats = [start_beat(name) for _ in range(3)]
            wait_for(lambda: store.get(leader_key), timeout=20)
            wait_for(lambda: len(ran.ran) >= 4, timeout=15)  # ~8 s of ticks
            leader_pid = int(store.get(leader_key).split(":")[1])
            killed = time.monotonic()
            os.kill(leader_pid, signal.SIGKILL)
            wait_for(lambda: (store.get(leader_key) or "").split(":")[1:2] not in ([], [str(leader_pid)]),
                     timeout=10, interval=0.05)
            takeover = time.monotonic() - killed
            ticks_at_kill = len(ran.ran)
            wait_for(lambda: len(ran.ran) >= ticks_at_kill + 5, timeout=20)  # ~10 s more
            for beat in beats:
                if beat.poll() is None:
                    beat.send_signal(signal.SIGTERM)
            codes = [beat.wait(15) for beat in beats]
            time.sleep(0.5)
            stats = worker.stats
    finally:
        for beat in beats:
            if beat.poll() is None:
                beat.kill()
        for key in (*store.keys(f"amqprpc:beat:{name}:*"), *store.keys(f"amqprpc:tick:{name}:*")):
            store.delete(key)
    times = sorted(datetime.fromisoformat(tick.split("@")[1]).timestamp() for tick in ran.ran)
    gaps = {round(b - a, 3) for a, b in zip(times, times[1:])}
    repeated = [tick for tick, n in collections.Counter(ran.ran).items() if n > 1]
    print(f"\nbeat: {len(ran.ran)} ticks over {times[-1] - times[0]:.0f} s, leader replaced {takeover:.2f} s after "
          f"kill -9, {ran.dropped} duplicate copies dropped, exit codes {sorted(codes)}")
    assert not repeated and gaps == {2.0}, (repeated, gaps)  # every tick, each once
    assert takeover <= 5.0
    assert sorted(codes) == [-signal.SIGKILL, 0, 0]
    assert stats["periodic_runs"] == len(ran.ran)


def test_beat_list_prints_schedules_and_next_runs(monkeypatch):
    monkeypatch.setenv("AMQPRPC_REDIS_URL", "redis://127.0.0.1:1/0")  # --list works without Redis
    result = subprocess.run([sys.executable, "-m", "amqprpc", "beat", "beat-listed", "--app", "beat_app:service",
                             "--list"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(TESTS), "BEAT_TEST_SERVICE": "beat-listed"})
    assert result.returncode == 0, result.stderr
    assert "beat-listed tick: tick every 2s misfire=once next=" in result.stdout and "last=-" in result.stdout


def test_shipped_beat_files_run_the_beat_as_a_worker_is_run():
    program = configparser.RawConfigParser(strict=False)
    program.read(ROOT / "supervisor" / "amqprpc-beat.conf")
    section = program["program:amqprpc-beat"]
    assert section["command"].split()[1:3] == ["beat", "user-service"]
    assert section["stopsignal"] == "TERM" and section["autorestart"] == "true"
    unit = configparser.RawConfigParser(strict=False)
    unit.optionxform = str  # type: ignore[assignment]
    unit.read(ROOT / "systemd" / "amqprpc-beat.service")
    assert unit["Service"]["Type"] == "notify" and unit["Service"]["ExecStart"].split()[1] == "beat"
    assert unit["Service"]["Restart"] == "on-failure" and unit["Service"]["RestartPreventExitStatus"] == "2"


@pytest.mark.skipif(__import__("shutil").which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verifies_the_beat_unit(tmp_path):
    import shutil

    text = (ROOT / "systemd" / "amqprpc-beat.service").read_text().replace(
        "/opt/amqprpc/venv/bin/amqprpc", str(Path(sys.executable).parent / "amqprpc"))
    (tmp_path / "amqprpc-beat.service").write_text(text)
    shutil.copy(ROOT / "systemd" / "amqprpc-shop.target", tmp_path / "amqprpc-shop.target")
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "amqprpc-beat.service"),
                             str(tmp_path / "amqprpc-shop.target")], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "amqprpc" not in output, output


class Casts:
    """Stands in for the beat's RpcClient: the ticks it would publish."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def cast(self, service: str, action: str, payload: dict, *, message_id: str, headers: dict,
             timeout: float) -> str:
        assert headers == {"x-tick": message_id.split("@")[0]}
        self.sent.append(message_id)
        return message_id

    def close(self) -> None:
        pass


@pytest.mark.integration
def test_missed_ticks_fire_once_or_are_skipped_and_redis_down_fires_nothing(redis_available):
    from amqprpc import Service
    from amqprpc.ops.beat import Beat

    name = unique_name("beat-misfire")
    service = Service(name)
    service.periodic("run", every=10, name="once")
    service.periodic("run", every=10, name="skip", misfire="skip")
    beat = Beat([service], catch_up=10.0)
    beat._client = casts = Casts()
    store = redis.Redis.from_url(redis_url(), decode_responses=True)
    try:
        beat.tick()  # first sight: each schedule starts from now, nothing fires
        assert casts.sent == [] and beat.leading == {name}
        for schedule in ("once", "skip"):  # as if no beat ran for 100 s
            store.set(f"amqprpc:beat:{name}:{schedule}:last", time.time() - 100)
        beat.tick()
        fired = collections.Counter(tick.split("@")[0] for tick in casts.sent)
        assert fired["once"] in (2, 3) and fired["skip"] in (1, 2)  # missed: 1 run or none; the last 10 s: each
        assert beat.stats_counts["misfires"] == 2
        before = list(casts.sent)
        beat.tick()
        assert casts.sent == before  # recorded: nothing fires twice
        from amqprpc.ops.beat import announced_schedules  # what amqprpc dashboard shows

        mine = [row for row in announced_schedules(store) if row["service"] == name]
        assert [(row["name"], row["action"]) for row in mine] == [("once", "run"), ("skip", "run")]
        assert all(row["next_run"] > datetime.now(timezone.utc).isoformat() for row in mine)
        other = Beat([service])
        other._client = Casts()
        other.tick()
        assert other.leading == set() and other._client.sent == []  # the lease is held: it waits
        down = Beat([service], redis_url="redis://127.0.0.1:1/0")
        down._client = Casts()
        down.tick()
        assert down.leading == set() and down._client.sent == [] and down._redis_down
    finally:
        beat.shutdown(1)
        for key in store.keys(f"amqprpc:beat:{name}:*"):
            store.delete(key)
        store.hdel("amqprpc:beat:schedules", f"{name}/once", f"{name}/skip")
