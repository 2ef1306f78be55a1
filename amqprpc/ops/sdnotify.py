"""systemd's readiness protocol (sd_notify(3)) without libsystemd.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET``, a unix datagram socket; a service
sends ``READY=1`` once it serves, ``STOPPING=1`` when it begins to stop and
``WATCHDOG=1`` at least every ``WATCHDOG_USEC`` microseconds. The protocol is one
datagram of newline-separated ``KEY=VALUE`` lines, so this is a dozen lines rather than
a dependency; without ``NOTIFY_SOCKET`` (Supervisor, a terminal) every call is a no-op.
"""
from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=serving"``) to systemd.
    Returns False when not run under a notify-aware supervisor or the send failed."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings (half of systemd's ``WatchdogSec``), or
    None when no watchdog is asked of this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
