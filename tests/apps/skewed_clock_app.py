"""A service whose host clock is wrong: ``AMQPRPC_TEST_CLOCK_SKEW`` seconds are added to
``time.time()`` in this whole process (the worker's log lines, its deadline checks, the
nested calls it makes), as on a host whose clock drifted. ``--app skewed_clock_app:service``;
the service is named by ``AMQPRPC_TEST_SERVICE``."""
from __future__ import annotations

import os
import time
from typing import Any

from amqprpc import Service, current_call

_SKEW = float(os.environ.get("AMQPRPC_TEST_CLOCK_SKEW", "0"))
if _SKEW:
    _real_time = time.time

    def _skewed_time() -> float:
        return _real_time() + _SKEW

    time.time = _skewed_time

service = Service(os.environ.get("AMQPRPC_TEST_SERVICE", "skewed-clock-test"))


@service.handler
def echo(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload back, with what this host thinks is left of the call's deadline."""
    call = current_call()
    return {"echo": payload, "remaining": call.remaining() if call is not None else None}


@service.handler
def block(payload: dict[str, Any]) -> None:
    time.sleep(float(payload.get("sleep", 0.6)))
