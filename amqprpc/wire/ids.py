"""Names that identify one running process, and text from Redis and AMQP values: built once here.

The wire layer (envelope, topology) and everything above use these; this module imports
nothing of amqprpc.
"""
from __future__ import annotations

import os
import re
import socket
from typing import Any


def new_instance_id() -> str:
    """``host.pid.random``: readable in a table, unique even when pids are reused. A worker's
    registry entry, its consumer tags and its broadcast queues all derive from its one id."""
    return f"{socket.gethostname()}.{os.getpid()}.{os.urandom(3).hex()}"


def text(value: Any) -> str:
    """A value read from Redis or an AMQP header as text: bytes decoded (an undecodable
    byte becomes U+FFFD, never an error), anything else through ``str``."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def snake_case(name: str) -> str:
    """``getUser`` -> ``get_user``; names already in snake_case are unchanged (how a proxy's
    method names and a worker's handler lookup agree)."""
    return _CAMEL_BOUNDARY.sub("_", name).lower()
