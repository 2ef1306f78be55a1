"""Unit tests (no broker): pidfile ownership, sd_notify datagrams, the metrics hooks."""
import os
import socket
import subprocess
import sys

import pytest

from amqprpc.middleware import metrics
from amqprpc.ops import sdnotify
from amqprpc.ops.pidfile import PidFile, PidFileError


def test_pidfile_is_written_refused_while_alive_taken_over_when_stale_and_removed(tmp_path):
    path = tmp_path / "w.pid"
    with PidFile(str(path)):
        assert path.read_text().strip() == str(os.getpid())
    assert not path.exists()

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(f"{sleeper.pid}\n")
        with pytest.raises(PidFileError, match="names running process"):
            PidFile(str(path)).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its process is gone (kill -9 leaves the file behind): taken over.
    with PidFile(str(path)):
        assert path.read_text().strip() == str(os.getpid())


def test_pidfile_release_leaves_a_file_naming_someone_else(tmp_path):
    path = tmp_path / "w.pid"
    lock = PidFile(str(path))
    lock.acquire()
    path.write_text("1\n")
    lock.release()
    assert path.exists()


def test_sd_notify_sends_one_datagram_and_is_a_no_op_without_notify_socket(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "n.sock"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
        assert sdnotify.notify("READY=1", "STATUS=serving")
        assert sock.recv(100) == b"READY=1\nSTATUS=serving"
    # A socket that went away is not an error for the worker.
    assert sdnotify.notify("STOPPING=1") is False


def test_watchdog_interval_is_half_the_period_and_only_for_our_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert sdnotify.watchdog_interval() is None


def test_dead_letter_counter():
    before = metrics.DEAD_LETTERS.labels("svc-unit", "retries_exhausted")._value.get()
    metrics.dead_letter("svc-unit", "retries_exhausted", 2)
    assert metrics.DEAD_LETTERS.labels("svc-unit", "retries_exhausted")._value.get() == before + 2
