"""Run ``amqprpc worker`` as a real child process and read its JSON log lines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

TESTS = os.path.dirname(os.path.abspath(__file__))


class WorkerProcess:
    """``python -m amqprpc worker SERVICE --app daemon_app:service ...``, logs to a file."""

    def __init__(self, service: str, log_path: str, *args: str, broker_url: str | None = None,
                 env: dict | None = None, app: str | None = "daemon_app:service"):
        self.log_path = log_path
        command = [sys.executable, "-m", "amqprpc", "worker", service, "--log-format", "json", *args]
        if app:
            command += ["--app", app]
        # No registry entries in the shared Redis (a kill -9 would leave them behind).
        environment = {**os.environ, "AMQPRPC_TEST_SERVICE": service, "AMQPRPC_REGISTRY_INTERVAL": "0",
                       "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]), **(env or {})}
        if broker_url:
            environment["AMQPRPC_BROKER_URL"] = broker_url
        self._log = open(log_path, "a")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=environment)

    @property
    def pid(self) -> int:
        return self.process.pid

    def lines(self) -> list[dict]:
        out = []
        with open(self.log_path) as handle:
            for line in handle:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"event": line.rstrip()})
        return out

    def events(self, name: str) -> list[dict]:
        return [line for line in self.lines() if line.get("event") == name]

    def wait_event(self, name: str, timeout: float = 30, count: int = 1) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(name)
            if len(found) >= count:
                return found[count - 1]
            if self.process.poll() is not None and not found:
                raise AssertionError(f"worker exited {self.process.returncode} before {name!r}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name!r} in the worker's log within {timeout}s:\n{self.text()}")
            time.sleep(0.05)

    def text(self) -> str:
        with open(self.log_path) as handle:
            return handle.read()[-6000:]

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait(10)
