"""Real subprocesses for tests: start one, wait (with a deadline) for a line it prints.

A reader thread drains the output from the start, so a chatty process never blocks on a
full pipe and a silent or dead one fails the wait with its output, never hangs it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

AMQPRPC = [sys.executable, "-m", "amqprpc"]


class Proc:
    def __init__(self, args: list[str], env: dict | None = None, cwd: str | None = None):
        self.args = args
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **(env or {})}, cwd=cwd)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for_line(self, text: str, timeout: float = 20.0, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"{self.args} never printed {text!r}; output:\n{''.join(self.lines)}")
                self._changed.wait(min(left, 0.5))

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.args} did not stop within {timeout}s; output:\n{self.output}")


def collector(queue: str, prefix: str, *extra: str, env: dict | None = None) -> Proc:
    """A real ``amqprpc collector`` process on its own queue and key prefix, ready."""
    proc = Proc(AMQPRPC + ["collector", "--queue", queue, "--key-prefix", prefix, "--log-format", "json",
                           "--shutdown-timeout", "5", *extra], env=env)
    proc.wait_for_line("collector ready")
    return proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
