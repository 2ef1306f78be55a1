"""Debian's Chromium, headless, driven over the DevTools protocol (a ``websockets`` client).

``scripts/chromium.sh`` installs it with apt-get when it is missing (once per machine; ~30 s
here). Every browser gets a fresh profile directory and none of Chromium's background
traffic (updates, sync, metrics), and is killed at the end whatever happened.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import pathlib
import shutil
import signal
import subprocess
import tempfile
from typing import Any

from websockets.sync.client import connect

from procs import Proc

SETUP = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "chromium.sh"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
         "--metrics-recording-only", "--mute-audio"]


def ensure_chromium() -> str:
    """The chromium binary, installed first when missing; AssertionError when it cannot be."""
    done = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"cannot install chromium: {done.stderr}"
    return done.stdout.strip()


class Browser:
    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="amqprpc-chromium-")
        self.proc = Proc([binary, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
                          "about:blank"])
        line = self.proc.wait_for_line("DevTools listening on", timeout=60)
        self._closing = contextlib.ExitStack()
        self.socket = self._closing.enter_context(
            connect(line.split("DevTools listening on ")[1].strip(), max_size=None, open_timeout=30))
        self._ids = itertools.count(1)

    def send(self, method: str, session: str | None = None, timeout: float = 30.0, **params: Any) -> dict:
        """One DevTools command; its result (events that arrive meanwhile are skipped)."""
        request_id = next(self._ids)
        message = {"id": request_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        while True:
            answer = json.loads(self.socket.recv(timeout))
            if answer.get("id") == request_id:
                assert "error" not in answer, f"{method}: {answer['error']}"
                return answer["result"]

    def open(self, url: str) -> "Page":
        target = self.send("Target.createTarget", url=url)["targetId"]
        return Page(self, self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"])

    def close(self) -> None:
        try:
            self._closing.close()
        finally:
            self.proc.stop(signal.SIGKILL)
            shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.browser.send("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        return result["result"].get("value")

    def screenshot(self, path: "str | pathlib.Path", width: int = 1280, height: int = 800) -> None:
        """Save what the page shows (``width`` x ``height`` CSS pixels) as a PNG."""
        import base64

        self.browser.send("Emulation.setDeviceMetricsOverride", self.session, width=width, height=height,
                          deviceScaleFactor=1, mobile=False)
        shot = self.browser.send("Page.captureScreenshot", self.session, format="png")
        pathlib.Path(path).write_bytes(base64.b64decode(shot["data"]))
