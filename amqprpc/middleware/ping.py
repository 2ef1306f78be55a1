"""The built-in ``ping`` action every worker answers (unless its service defines its own).

A middleware (:mod:`amqprpc.middleware`) that registers the action on the worker as it
starts: who answered and when, for ``amqprpc ping`` and health checks. Every
:class:`~amqprpc.server.worker.Worker` runs one.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any

from amqprpc.middleware import Middleware
from amqprpc.middleware.view import WorkerView


class Ping(Middleware):
    def worker_starting(self, worker: WorkerView) -> None:
        worker.builtins.setdefault("ping", lambda payload: answer(worker))


def answer(worker: Any) -> dict[str, Any]:
    """What ``ping`` answers: this instance, its host and pid, the time and its uptime (s)."""
    now = time.time()
    return {"instance_id": worker.instance_id, "service": worker.service.name, "host": socket.gethostname(),
            "pid": os.getpid(), "time": now, "uptime": round(now - worker.started_at, 3)}
